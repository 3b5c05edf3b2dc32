//! Turning what the vendor sends (events) or what billsync fetched (states) into inbox rows.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::store::{NewEvent, Source};
use crate::stripe::ObjectKind;
use crate::stripe::objects;

/// Why an event cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadEvent(pub String);

/// An inbox row for a vendor event. Only `id`, `type` and `created` are required; everything else
/// is read tolerantly and the raw text is kept as it came.
pub fn from_event(raw: &str, event: &Value, source: Source) -> Result<NewEvent, BadEvent> {
    let event_id = event["id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| BadEvent("the event has no id".into()))?;
    let event_type = event["type"]
        .as_str()
        .ok_or_else(|| BadEvent("the event has no type".into()))?;
    let created = objects::int(&event["created"])
        .ok_or_else(|| BadEvent("the event has no created time".into()))?;
    let object = &event["data"]["object"];
    let target = objects::target(object);
    let customer_id = match &target {
        Some((kind, id)) if *kind == ObjectKind::Customer => Some(id.clone()),
        _ => objects::id_of(&object["customer"]),
    };
    // Newer API versions give request as an object; old ones as a bare request id.
    let idempotency_key = event["request"]["idempotency_key"]
        .as_str()
        .map(str::to_owned);
    Ok(NewEvent {
        event_id: event_id.to_owned(),
        event_type: event_type.to_owned(),
        source,
        object_type: target.as_ref().map(|(kind, _)| kind.as_str().to_owned()),
        object_id: target.map(|(_, id)| id),
        customer_id,
        event_created: created.saturating_mul(1000),
        idempotency_key,
        payload: raw.to_owned(),
    })
}

/// An inbox row for a state billsync fetched itself (sweep, backfill, reconciliation, a command's
/// answer), observed by a request sent at `fetched_at_ms` (`sync::observe`): that moment is the
/// row's `event_created` and the state's version. Callers store one only when it differs from the
/// mirror; its id names the object, the fetch time and the content.
pub fn from_fetched_state(
    kind: ObjectKind,
    object: &Value,
    source: Source,
    fetched_at_ms: i64,
) -> Option<NewEvent> {
    let (target_kind, object_id) = objects::target(object)?;
    if target_kind != kind {
        return None;
    }
    let digest = Sha256::digest(object.to_string().as_bytes());
    let event_type = format!("billsync.{}.{}", source.as_str(), kind.as_str());
    let event_id = format!(
        "{}_{}_{}_{}_{}",
        source.as_str(),
        kind.as_str(),
        object_id,
        fetched_at_ms,
        &hex::encode(digest)[..12]
    );
    let payload = json!({
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created": fetched_at_ms / 1000,
        "data": { "object": object },
    });
    Some(NewEvent {
        event_id,
        event_type,
        source,
        object_type: Some(kind.as_str().to_owned()),
        customer_id: objects::customer_of(kind, object),
        object_id: Some(object_id),
        event_created: fetched_at_ms,
        idempotency_key: None,
        payload: payload.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_need_only_id_type_and_created() {
        let event = json!({"id": "evt_1", "type": "something.new", "created": 1700000000, "data": {"object": {"object": "widget"}}});
        let row = from_event(&event.to_string(), &event, Source::Webhook).unwrap();
        assert_eq!(row.event_created, 1_700_000_000_000);
        assert_eq!(
            row.object_type, None,
            "unknown objects are stored, not applied"
        );
        let no_id = json!({"type": "x", "created": 1});
        assert!(from_event("{}", &no_id, Source::Webhook).is_err());
    }

    #[test]
    fn our_own_commands_are_recognised_by_idempotency_key() {
        let event = json!({"id": "evt_2", "type": "customer.updated", "created": 1,
            "request": {"id": "req_1", "idempotency_key": "billsync-cmd-9"},
            "data": {"object": {"object": "customer", "id": "cus_1"}}});
        let row = from_event(&event.to_string(), &event, Source::Poll).unwrap();
        assert_eq!(row.idempotency_key.as_deref(), Some("billsync-cmd-9"));
        assert_eq!(row.customer_id.as_deref(), Some("cus_1"));
        let legacy = json!({"id": "evt_3", "type": "customer.updated", "created": 1, "request": "req_1",
            "data": {"object": {"object": "customer", "id": "cus_1"}}});
        assert_eq!(
            from_event("{}", &legacy, Source::Poll)
                .unwrap()
                .idempotency_key,
            None
        );
    }

    #[test]
    fn fetched_states_get_ids_from_fetch_time_and_content() {
        let a = json!({"object": "subscription", "id": "sub_1", "customer": "cus_1", "status": "active"});
        let b = json!({"object": "subscription", "id": "sub_1", "customer": "cus_1", "status": "past_due"});
        let first = from_fetched_state(ObjectKind::Subscription, &a, Source::Sweep, 5_000).unwrap();
        let same = from_fetched_state(ObjectKind::Subscription, &a, Source::Sweep, 5_000).unwrap();
        let later = from_fetched_state(ObjectKind::Subscription, &a, Source::Sweep, 9_000).unwrap();
        let changed =
            from_fetched_state(ObjectKind::Subscription, &b, Source::Sweep, 5_000).unwrap();
        assert_eq!(first.event_id, same.event_id);
        assert_ne!(
            first.event_id, later.event_id,
            "A -> B -> A must apply the second A"
        );
        assert_ne!(first.event_id, changed.event_id);
        assert_eq!(first.event_created, 5_000);
        assert_eq!(first.customer_id.as_deref(), Some("cus_1"));
    }
}
