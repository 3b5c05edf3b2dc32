use super::*;

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn features() -> BTreeMap<String, Grant> {
    let quota = |limit| Grant::Quota {
        limit,
        meter: "m_api_calls".to_owned(),
    };
    BTreeMap::from([
        ("sso".to_owned(), Grant::Boolean { enabled: true }),
        ("audit_log".to_owned(), Grant::Boolean { enabled: false }),
        ("api_calls".to_owned(), quota(Some(100))),
        ("exports".to_owned(), quota(None)),
    ])
}

fn rules(standing: Standing, synced: bool, features: &BTreeMap<String, Grant>) -> TenantRules<'_> {
    TenantRules {
        standing,
        synced,
        features,
    }
}

/// `decide` with a fixed `used` and no feature failing open.
fn check(rules: &TenantRules, feature: &str, quantity: &str, used: &str) -> Verdict {
    rules.decide(feature, dec(quantity), || false, |_| dec(used))
}

#[test]
fn a_granted_boolean_feature_is_ok() {
    let f = features();
    let v = check(&rules(Standing::Subscribed, true, &f), "sso", "1", "0");
    assert_eq!(v, Verdict::bare(true, reason::OK));
}

#[test]
fn a_missing_or_disabled_feature_is_not_in_plan() {
    let f = features();
    let r = rules(Standing::Subscribed, true, &f);
    for feature in ["audit_log", "nonexistent"] {
        let v = check(&r, feature, "1", "0");
        assert_eq!(v, Verdict::bare(false, reason::FEATURE_NOT_IN_PLAN));
    }
}

#[test]
fn no_subscription_and_inactive_refuse_every_feature() {
    let f = features();
    let v = check(&rules(Standing::NoSubscription, true, &f), "sso", "1", "0");
    assert_eq!(v, Verdict::bare(false, reason::NO_SUBSCRIPTION));
    let v = check(&rules(Standing::Inactive, true, &f), "sso", "1", "0");
    assert_eq!(v, Verdict::bare(false, reason::SUBSCRIPTION_INACTIVE));
}

#[test]
fn a_quota_reaching_its_limit_exactly_is_allowed() {
    let f = features();
    let r = rules(Standing::Subscribed, true, &f);
    let v = check(&r, "api_calls", "0.01", "99.99");
    assert_eq!(
        v,
        Verdict {
            allowed: true,
            reason: reason::OK,
            limit: Some(100),
            used: Some(dec("99.99")),
            remaining: Some(dec("0.01")),
        }
    );
}

#[test]
fn one_minor_unit_over_the_limit_is_refused() {
    let f = features();
    let r = rules(Standing::Subscribed, true, &f);
    let v = check(&r, "api_calls", "0.02", "99.99");
    assert!(!v.allowed);
    assert_eq!(v.reason, reason::LIMIT_EXCEEDED);
    assert_eq!(v.remaining, Some(dec("0.01")));
    let v = check(&r, "api_calls", "0.000001", "100");
    assert_eq!(v.reason, reason::LIMIT_EXCEEDED);
}

#[test]
fn used_and_remaining_are_normalized_and_remaining_never_negative() {
    let f = features();
    let r = rules(Standing::Subscribed, true, &f);
    let v = check(&r, "api_calls", "1", "105.500");
    assert_eq!(v.used.unwrap().to_string(), "105.5");
    assert_eq!(v.remaining.unwrap().to_string(), "0");
    let v = check(&r, "api_calls", "1", "40.00");
    assert_eq!(v.used.unwrap().to_string(), "40");
    assert_eq!(v.remaining.unwrap().to_string(), "60");
}

#[test]
fn an_unlimited_quota_reports_used_and_no_limit() {
    let f = features();
    let r = rules(Standing::Subscribed, true, &f);
    let v = check(&r, "exports", "1000000", "12.50");
    assert_eq!(
        v,
        Verdict {
            used: Some(dec("12.5")),
            ..Verdict::bare(true, reason::OK)
        }
    );
}

#[test]
fn used_is_read_from_the_quotas_meter_and_only_for_a_quota() {
    let f = features();
    let r = rules(Standing::Subscribed, true, &f);
    let mut asked = Vec::new();
    r.decide(
        "api_calls",
        Decimal::ONE,
        || false,
        |m| {
            asked.push(m.to_owned());
            Decimal::ZERO
        },
    );
    r.decide("sso", Decimal::ONE, || false, |_| panic!("not a quota"));
    assert_eq!(asked, ["m_api_calls"]);
}

#[test]
fn a_tenant_never_synced_fails_closed_unless_the_feature_fails_open() {
    let f = features();
    for standing in [
        Standing::Subscribed,
        Standing::NoSubscription,
        Standing::Inactive,
    ] {
        let r = rules(standing, false, &f);
        let closed = r.decide("api_calls", Decimal::ONE, || false, |_| panic!("no quota"));
        assert_eq!(closed, Verdict::bare(false, reason::NO_SUBSCRIPTION));
        // Open even beyond the plan: nothing about the plan is known.
        let open = r.decide("nonexistent", Decimal::ONE, || true, |_| panic!("no quota"));
        assert_eq!(open, Verdict::bare(true, reason::OK));
    }
}

#[test]
fn the_free_plan_is_decided_as_usual_before_any_sync() {
    let f = features();
    let r = rules(Standing::Free, false, &f);
    let v = r.decide("api_calls", dec("2"), || panic!("not asked"), |_| dec("99"));
    assert_eq!(v.reason, reason::LIMIT_EXCEEDED);
    let v = r.decide("audit_log", dec("1"), || panic!("not asked"), |_| dec("0"));
    assert_eq!(v.reason, reason::FEATURE_NOT_IN_PLAN);
}

#[test]
fn fails_open_is_asked_only_for_a_tenant_never_synced() {
    let f = features();
    let r = rules(Standing::NoSubscription, true, &f);
    let v = r.decide(
        "sso",
        Decimal::ONE,
        || panic!("not asked"),
        |_| Decimal::ZERO,
    );
    assert_eq!(v.reason, reason::NO_SUBSCRIPTION);
    let c = r.ceiling("sso", Decimal::ONE, || panic!("not asked"));
    assert_eq!(c, Ceiling::Never);
}

#[test]
fn ceilings_follow_the_grant() {
    let f = features();
    let r = rules(Standing::Subscribed, true, &f);
    let c = |feature| r.ceiling(feature, dec("0.5"), || false);
    assert_eq!(c("api_calls"), Ceiling::AtMost(dec("99.5")));
    assert_eq!(c("exports"), Ceiling::Unlimited);
    assert_eq!(c("sso"), Ceiling::Unlimited);
    assert_eq!(c("audit_log"), Ceiling::Never);
    assert_eq!(c("nonexistent"), Ceiling::Never);
    let unsynced = rules(Standing::Subscribed, false, &f);
    assert_eq!(
        unsynced.ceiling("api_calls", Decimal::ONE, || true),
        Ceiling::Unlimited
    );
    assert_eq!(
        unsynced.ceiling("api_calls", Decimal::ONE, || false),
        Ceiling::Never
    );
}

#[test]
fn a_ceiling_admits_nothing_yet_as_zero() {
    assert!(Ceiling::AtMost(Decimal::ZERO).admits(None));
    assert!(!Ceiling::AtMost(dec("-0.01")).admits(None));
    assert!(!Ceiling::Never.admits(None));
    assert!(Ceiling::Unlimited.admits(Some(Decimal::MAX)));
}

#[test]
fn decide_allows_exactly_when_the_ceiling_admits_used() {
    let f = features();
    let standings = [
        Standing::Subscribed,
        Standing::Free,
        Standing::NoSubscription,
        Standing::Inactive,
    ];
    let features = ["sso", "audit_log", "api_calls", "exports", "nonexistent"];
    let amounts = ["0", "0.01", "1", "99.99", "100", "100.01", "250"];
    for standing in standings {
        for synced in [true, false] {
            for open in [true, false] {
                let r = rules(standing, synced, &f);
                for feature in features {
                    for quantity in amounts {
                        let ceiling = r.ceiling(feature, dec(quantity), || open);
                        for used in amounts {
                            let v = r.decide(feature, dec(quantity), || open, |_| dec(used));
                            assert_eq!(
                                v.allowed,
                                ceiling.admits(Some(dec(used))),
                                "{standing:?} synced={synced} open={open} {feature} \
                                 quantity={quantity} used={used}"
                            );
                        }
                    }
                }
            }
        }
    }
}
