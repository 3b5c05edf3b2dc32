use rust_decimal::Decimal;

use super::{Applied, Replica};

const HELLO: &str = r#"{"coalesce_ms":100,"fail_open":["beta"],"heartbeat_ms":15000,"protocol":1,"stale_after_ms":600000}"#;

fn acme(plan_limit: i64, used: &str) -> String {
    format!(
        r#"{{"tenant_id":"acme","plan":"price_pro","status":"active","standing":"subscribed","synced":true,
        "features":{{"api_calls":{{"kind":"quota","limit":{plan_limit},"meter":"calls","used":"{used}"}},
                    "sso":{{"kind":"boolean","enabled":true}}}},
        "period_start":"2026-12-01T00:00:00.000Z","period_end":"2027-01-01T00:00:00.000Z",
        "as_of":"2026-12-07T06:14:16.577Z","stale":false,"expires_at":null,"new_field":1}}"#
    )
}

fn ready(resumed: bool) -> String {
    format!(r#"{{"cursor":"1-2","resumed":{resumed}}}"#)
}

/// A replica holding `acme` (api_calls 1000, 12 used) after a snapshot.
fn replica() -> Replica {
    let mut replica = Replica::default();
    replica.begin(true);
    let hello = replica.apply("hello", HELLO).unwrap();
    assert!(matches!(hello, Applied::Hello { heartbeat } if heartbeat.as_millis() == 15_000));
    replica.apply("tenant", &acme(1000, "12")).unwrap();
    assert_eq!(replica.len(), 0, "the snapshot replaces the copy at ready");
    let ready = replica.apply("ready", &ready(false)).unwrap();
    assert_eq!(ready, Applied::Ready { resumed: false });
    replica
}

fn d(n: i64) -> Decimal {
    Decimal::from(n)
}

#[test]
fn a_snapshot_answers_checks_by_the_shared_rules() {
    let replica = replica();
    let check = replica.check("acme", "api_calls", d(5)).unwrap();
    assert!(check.allowed);
    assert_eq!(check.reason, "ok");
    assert_eq!(
        (check.limit, check.used, check.remaining),
        (Some(1000), Some(d(12)), Some(d(988)))
    );
    assert_eq!(check.as_of.as_deref(), Some("2026-12-07T06:14:16.577Z"));
    assert!(replica.check("acme", "sso", d(1)).unwrap().allowed);
    let missing = replica.check("acme", "exports", d(1)).unwrap();
    assert_eq!(missing.reason, "feature_not_in_plan");
    assert!(replica.check("globex", "sso", d(1)).is_none());
    assert_eq!(replica.stale_after.unwrap().as_secs(), 600);
}

#[test]
fn usage_events_set_the_figure_of_the_quotas_on_their_meter() {
    let mut replica = replica();
    replica
        .apply(
            "usage",
            r#"{"tenant_id":"acme","meter":"calls","used":"998","at":"2026-12-07T06:20:01.250Z"}"#,
        )
        .unwrap();
    let check = replica.check("acme", "api_calls", d(3)).unwrap();
    assert_eq!(
        (check.allowed, check.reason.as_ref()),
        (false, "limit_exceeded")
    );
    assert_eq!(check.remaining, Some(d(2)));
    // Usage of a tenant not held is ignored.
    let other = r#"{"tenant_id":"zzz","meter":"calls","used":"1","at":"2026-12-07T06:20:01.250Z"}"#;
    assert_eq!(replica.apply("usage", other).unwrap(), Applied::Nothing);
}

#[test]
fn local_usage_counts_at_once_until_the_stream_has_it() {
    let mut replica = replica();
    replica.add_pending("acme", "calls", d(100));
    let used = |r: &Replica| r.check("acme", "api_calls", d(0)).unwrap().used;
    assert_eq!(used(&replica), Some(d(112)));
    // Accepted by the server: still counted, until a figure from the stream holds it.
    replica.settle("acme", "calls", d(100), true);
    assert_eq!(used(&replica), Some(d(112)));
    let usage =
        r#"{"tenant_id":"acme","meter":"calls","used":"112","at":"2026-12-07T06:20:01.250Z"}"#;
    replica.apply("usage", usage).unwrap();
    assert_eq!(used(&replica), Some(d(112)));
    // Refused by the server: no longer counted.
    replica.add_pending("acme", "calls", d(7));
    assert_eq!(used(&replica), Some(d(119)));
    replica.settle("acme", "calls", d(7), false);
    assert_eq!(used(&replica), Some(d(112)));
}

#[test]
fn removed_and_reset_drop_tenants_and_a_resume_applies_in_place() {
    let mut replica = replica();
    replica.apply("removed", r#"{"tenant_id":"acme"}"#).unwrap();
    assert!(replica.check("acme", "sso", d(1)).is_none());
    // A resumed stream's tenants apply at once.
    replica.apply("tenant", &acme(50, "0")).unwrap();
    assert_eq!(
        replica.check("acme", "api_calls", d(1)).unwrap().limit,
        Some(50)
    );
    // After a reset the old copy answers until the new one is ready, then is replaced.
    replica
        .apply("reset", r#"{"reason":"catalog_changed"}"#)
        .unwrap();
    assert!(replica.check("acme", "api_calls", d(1)).is_some());
    let ready = replica.apply("ready", &ready(false)).unwrap();
    assert_eq!(ready, Applied::Ready { resumed: false });
    assert!(replica.check("acme", "api_calls", d(1)).is_none());
}

#[test]
fn a_tenant_never_synced_is_closed_unless_the_feature_fails_open() {
    let mut replica = replica();
    let never = r#"{"tenant_id":"new","standing":"no_subscription","synced":false,"features":{},
        "as_of":null,"stale":true}"#;
    replica.apply("tenant", never).unwrap();
    let closed = replica.check("new", "sso", d(1)).unwrap();
    assert_eq!(
        (closed.allowed, closed.reason.as_ref(), closed.stale),
        (false, "no_subscription", true)
    );
    let open = replica.check("new", "beta", d(1)).unwrap();
    assert_eq!((open.allowed, open.reason.as_ref()), (true, "ok"));
}

#[test]
fn bye_and_bad_events_are_reported() {
    let mut replica = replica();
    let bye = replica
        .apply("bye", r#"{"reason":"shutdown","cursor":"5-6"}"#)
        .unwrap();
    assert_eq!(
        bye,
        Applied::Bye {
            reason: "shutdown".to_owned()
        }
    );
    assert!(replica.apply("tenant", "{not json").is_err());
    let bad_used = r#"{"tenant_id":"acme","meter":"calls","used":"lots","at":"x"}"#;
    assert!(replica.apply("usage", bad_used).is_err());
    assert_eq!(
        replica.apply("something_new", "{}").unwrap(),
        Applied::Nothing
    );
}

#[test]
fn tenant_ids_short_and_long_are_found_updated_and_removed() {
    let mut replica = replica();
    // 30 bytes fit inside the map's memory; 31 and 64 do not.
    for id in ["a", &"b".repeat(30), &"c".repeat(31), &"d".repeat(64)] {
        let tenant =
            acme(10, "3").replace(r#""tenant_id":"acme""#, &format!(r#""tenant_id":"{id}""#));
        replica.apply("tenant", &tenant).unwrap();
        assert_eq!(
            replica.check(id, "api_calls", d(1)).unwrap().used,
            Some(d(3))
        );
        let usage = format!(r#"{{"tenant_id":"{id}","meter":"calls","used":"9"}}"#);
        replica.apply("usage", &usage).unwrap();
        assert_eq!(
            replica.check(id, "api_calls", d(1)).unwrap().used,
            Some(d(9))
        );
        assert!(replica.check(&id[1..], "api_calls", d(1)).is_none());
        replica
            .apply("removed", &format!(r#"{{"tenant_id":"{id}"}}"#))
            .unwrap();
        assert!(replica.check(id, "api_calls", d(1)).is_none());
    }
    assert_eq!(replica.len(), 1, "acme alone is left");
}

#[test]
fn a_credit_priced_feature_is_never_allowed_from_memory_even_when_the_plan_grants_it() {
    let mut replica = Replica::default();
    replica.begin(true);
    let hello = r#"{"fail_open":[],"heartbeat_ms":15000,"protocol":1,
        "credit_features":{"api_calls":{"meter":"calls","unit":"usd","credits_per_unit":"0.0167"}}}"#;
    replica.apply("hello", hello).unwrap();
    replica.apply("tenant", &acme(1000, "12")).unwrap();
    replica.apply("ready", &ready(false)).unwrap();
    // The plan would allow it as a quota; the copy has no balance, so it does not decide.
    let check = replica.check("acme", "api_calls", d(1)).unwrap();
    assert!(!check.allowed);
    assert_eq!(check.reason, crate::reason::NEEDS_SERVER);
    assert_eq!(check.as_of.as_deref(), Some("2026-12-07T06:14:16.577Z"));
    let price = replica.credit_price("api_calls").unwrap();
    assert_eq!(
        (
            price.unit.as_str(),
            price.credits_per_unit.to_string().as_str()
        ),
        ("usd", "0.0167")
    );
    // Other features are decided as before; an unknown tenant is still unknown.
    assert!(replica.check("acme", "sso", d(1)).unwrap().allowed);
    assert!(replica.check("globex", "api_calls", d(1)).is_none());
    // A server before credits sends no `credit_features`: nothing is credit-priced.
    replica.apply("hello", HELLO).unwrap();
    assert!(replica.check("acme", "api_calls", d(1)).unwrap().allowed);
}
