//! Fuzz target: the event envelope parser, i.e. what `POST /webhooks/stripe` does with the raw
//! body once the signature checked out: UTF-8, then `serde_json::from_str::<Value>`, then
//! `billsync::sync::events::from_event(raw, &event, Source::Webhook)`, which makes the inbox row
//! (the poller runs the same `from_event` on `event.to_string()`).
//!
//! Each input is used twice:
//!
//! 1. As a raw webhook body (the seeds are Stripe events built from Stripe's own fixtures).
//! 2. Through `arbitrary`, as a structured envelope (id, type, created, data.object, request in
//!    their current, legacy and odd shapes), serialised to JSON; the row must be what the
//!    envelope says.
//!
//! Properties checked (a violation aborts with a crash artifact, see docs/fuzzing.md):
//!
//! - Never panics, on any bytes.
//! - Deterministic: parsing the same text twice gives equal values and equal rows.
//! - Accepted exactly when the envelope has a non-empty string `id`, a string `type` and an
//!   integer (or integer-string) `created`; an accepted row keeps the id and the type, `created`
//!   in milliseconds (saturating), the raw text as its payload, and `request.idempotency_key`.
//! - `object_type` and `object_id` come together, name a kind billsync mirrors, and a customer
//!   row's customer is itself.
//! - Round trip: the event written back out by serde_json and read again is the same value
//!   (floats within a few ULPs, see `same_json`) and gives the same row (what a webhook and the
//!   poller store for one event agree).
//! - Structured envelopes: the row's fields are exactly those the envelope was built with.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use billsync::store::{NewEvent, Source};
use billsync::sync::events::{BadEvent, from_event};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

fuzz_target!(|data: &[u8]| {
    // 1. The raw body, as the webhook handler reads it.
    if let Ok(raw) = std::str::from_utf8(data)
        && let Ok(event) = serde_json::from_str::<Value>(raw)
    {
        let _ = check_body(raw, &event);
    }

    // 2. A structured envelope.
    if let Ok(envelope) = Envelope::arbitrary(&mut Unstructured::new(data)) {
        check_envelope(&envelope);
    }
});

/// The kinds billsync mirrors, as `object_type` names them.
const KINDS: [&str; 11] = [
    "customer",
    "product",
    "price",
    "plan",
    "subscription",
    "subscription_schedule",
    "invoice",
    "payment_intent",
    "charge",
    "credit_note",
    "active_entitlements",
];

/// Everything in a row but its payload and source.
type Fields = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    Option<String>,
);

fn fields(row: &NewEvent) -> Fields {
    (
        row.event_id.clone(),
        row.event_type.clone(),
        row.object_type.clone(),
        row.object_id.clone(),
        row.customer_id.clone(),
        row.event_created,
        row.idempotency_key.clone(),
    )
}

fn same(a: &Result<NewEvent, BadEvent>, b: &Result<NewEvent, BadEvent>) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => fields(a) == fields(b) && a.payload == b.payload && a.source == b.source,
        (Err(a), Err(b)) => a == b,
        _ => false,
    }
}

/// Checks a body that is JSON, whatever its shape; returns the row.
fn check_body(raw: &str, event: &Value) -> Result<NewEvent, BadEvent> {
    let row = from_event(raw, event, Source::Webhook);

    // Deterministic.
    let again: Value = serde_json::from_str(raw).expect("the same text parses again");
    assert_eq!(&again, event, "parsing is not deterministic");
    assert!(
        same(&row, &from_event(raw, &again, Source::Webhook)),
        "from_event is not deterministic"
    );

    // Accepted exactly when id, type and created are there, and then keeps them.
    let id = event
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    let event_type = event.get("type").and_then(Value::as_str);
    let created = match event.get("created") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.parse::<i64>().ok(),
        _ => None,
    };
    match (id, event_type, created, &row) {
        (Some(id), Some(event_type), Some(created), Ok(row)) => {
            assert_eq!(row.event_id, id);
            assert_eq!(row.event_type, event_type);
            assert_eq!(row.event_created, created.saturating_mul(1000));
            assert_eq!(row.payload, raw, "the raw text is kept as it came");
            assert_eq!(row.source, Source::Webhook);
            assert_eq!(
                row.idempotency_key.as_deref(),
                event
                    .get("request")
                    .and_then(|r| r.get("idempotency_key"))
                    .and_then(Value::as_str)
            );
            assert_eq!(
                row.object_type.is_some(),
                row.object_id.is_some(),
                "object type and id come together: {row:?}"
            );
            if let Some(kind) = &row.object_type {
                assert!(KINDS.contains(&kind.as_str()), "unknown kind {kind}");
            }
            if row.object_type.as_deref() == Some("customer") {
                assert_eq!(row.customer_id, row.object_id);
            }
        }
        (Some(_), Some(_), Some(_), Err(e)) => panic!("a valid envelope was refused: {e}"),
        (_, _, _, Ok(row)) => panic!("an envelope without id, type or created was kept: {row:?}"),
        (_, _, _, Err(_)) => {}
    }

    // Round trip through serde_json's own text: the same value, and the same row.
    let text = serde_json::to_string(event).expect("a Value always serialises");
    let back: Value = serde_json::from_str(&text).expect("serde_json reads what it writes");
    assert!(
        same_json(&back, event),
        "the event changed in a round trip: {text}"
    );
    let polled = from_event(&text, &back, Source::Poll);
    match (&row, &polled) {
        (Ok(a), Ok(b)) => {
            assert_eq!(fields(a), fields(b), "webhook and poller rows differ");
            assert_eq!(b.payload, text);
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("webhook and poller disagree: {row:?} / {polled:?}"),
    }
    row
}

/// JSON equality, but floats may be a few ULPs apart: without its `float_roundtrip` feature
/// (which billsync does not enable) serde_json's float parsing is best effort, and reads back a
/// float it wrote up to 2 ULPs off (the most seen over 2 million random doubles). billsync keeps
/// the raw text and reads no float from an envelope, so that is no loss for it.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y
                || (x.is_sign_positive() == y.is_sign_positive()
                    && x.to_bits().abs_diff(y.to_bits()) <= 4)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

// --- Structured envelopes -----------------------------------------------------------------

#[derive(Arbitrary, Debug)]
struct Envelope {
    id: StrField,
    event_type: StrField,
    created: Created,
    data: Data,
    request: Request,
    /// Other top-level fields (`object`, `livemode`, `api_version`, ...).
    extra: Vec<(String, Scalar)>,
}

/// A string field in its usual and unusual shapes.
#[derive(Arbitrary, Debug)]
enum StrField {
    Missing,
    Null,
    Text(String),
    Number(i64),
}

#[derive(Arbitrary, Debug)]
enum Created {
    Missing,
    Null,
    Int(i64),
    Unsigned(u64),
    Float(f64),
    /// Odd fakes send a numeric string.
    Text(String),
    Bool(bool),
}

#[derive(Arbitrary, Debug)]
enum Data {
    Missing,
    NotAnObject(Scalar),
    NoObject,
    ObjectNotAMap(Scalar),
    Object(Object),
}

#[derive(Arbitrary, Debug)]
struct Object {
    object: ObjectType,
    id: IdRef,
    customer: IdRef,
    charge: IdRef,
    /// Other fields (`status`, `items`, `previous_attributes` beside it, ...).
    extra: Vec<(String, Scalar)>,
}

#[derive(Arbitrary, Debug)]
enum ObjectType {
    Missing,
    Known(u8),
    Other(String),
    NotAString(i64),
}

const OBJECT_TYPES: [&str; 14] = [
    "customer",
    "product",
    "price",
    "plan",
    "subscription",
    "subscription_schedule",
    "invoice",
    "payment_intent",
    "charge",
    "credit_note",
    "entitlements.active_entitlement_summary",
    "refund",
    "dispute",
    "subscription_item",
];

/// An id as Stripe gives it: a string, or an expanded object with an `id`.
#[derive(Arbitrary, Debug)]
enum IdRef {
    Missing,
    Null,
    Text(String),
    Expanded(Option<String>),
    Number(i64),
}

#[derive(Arbitrary, Debug)]
enum Request {
    Missing,
    Null,
    /// Old API versions: a bare request id.
    Legacy(String),
    Object {
        id: Option<String>,
        idempotency_key: StrField,
    },
}

#[derive(Arbitrary, Debug)]
enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    List(Vec<String>),
}

impl Scalar {
    fn value(&self) -> Value {
        match self {
            Scalar::Null => Value::Null,
            Scalar::Bool(b) => json!(b),
            Scalar::Int(i) => json!(i),
            Scalar::Float(f) => json!(f),
            Scalar::Text(s) => json!(s),
            Scalar::List(l) => json!(l),
        }
    }
}

impl StrField {
    fn insert(&self, map: &mut Map<String, Value>, key: &str) {
        match self {
            StrField::Missing => return,
            StrField::Null => map.insert(key.into(), Value::Null),
            StrField::Text(s) => map.insert(key.into(), json!(s)),
            StrField::Number(n) => map.insert(key.into(), json!(n)),
        };
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            StrField::Text(s) => Some(s),
            _ => None,
        }
    }
}

impl IdRef {
    fn insert(&self, map: &mut Map<String, Value>, key: &str) {
        let value = match self {
            IdRef::Missing => return,
            IdRef::Null => Value::Null,
            IdRef::Text(s) => json!(s),
            IdRef::Expanded(Some(id)) => json!({ "id": id, "object": key }),
            IdRef::Expanded(None) => json!({ "object": key }),
            IdRef::Number(n) => json!(n),
        };
        map.insert(key.into(), value);
    }
    /// The id billsync should read: a non-empty string, or an expanded object's string `id`.
    /// (An expanded object's empty `id` is taken as it is: that is what `objects::id_of` does.)
    fn expected(&self) -> Option<String> {
        match self {
            IdRef::Text(s) if !s.is_empty() => Some(s.clone()),
            IdRef::Expanded(Some(id)) => Some(id.clone()),
            _ => None,
        }
    }
}

impl Object {
    fn type_name(&self) -> Option<String> {
        match &self.object {
            ObjectType::Known(i) => Some(OBJECT_TYPES[usize::from(*i) % OBJECT_TYPES.len()].into()),
            ObjectType::Other(s) => Some(s.clone()),
            ObjectType::Missing | ObjectType::NotAString(_) => None,
        }
    }
    fn value(&self) -> Value {
        let mut map = Map::new();
        for (key, value) in &self.extra {
            map.insert(format!("x_{key}"), value.value());
        }
        match &self.object {
            ObjectType::NotAString(n) => {
                map.insert("object".into(), json!(n));
            }
            _ => {
                if let Some(name) = self.type_name() {
                    map.insert("object".into(), json!(name));
                }
            }
        }
        self.id.insert(&mut map, "id");
        self.customer.insert(&mut map, "customer");
        self.charge.insert(&mut map, "charge");
        Value::Object(map)
    }
    /// `(object_type, object_id)` as billsync's table of mirrored kinds has it.
    fn expected_target(&self) -> Option<(&'static str, String)> {
        let name = self.type_name()?;
        let (kind, id) = match name.as_str() {
            "customer" => ("customer", &self.id),
            "product" => ("product", &self.id),
            "price" => ("price", &self.id),
            "plan" => ("plan", &self.id),
            "subscription" => ("subscription", &self.id),
            "subscription_schedule" => ("subscription_schedule", &self.id),
            "invoice" => ("invoice", &self.id),
            "payment_intent" => ("payment_intent", &self.id),
            "charge" => ("charge", &self.id),
            "credit_note" => ("credit_note", &self.id),
            "entitlements.active_entitlement_summary" => ("active_entitlements", &self.customer),
            "refund" | "dispute" => ("charge", &self.charge),
            _ => return None,
        };
        Some((kind, id.expected()?))
    }
}

impl Envelope {
    fn value(&self) -> Value {
        let mut map = Map::new();
        for (key, value) in &self.extra {
            map.insert(format!("x_{key}"), value.value());
        }
        self.id.insert(&mut map, "id");
        self.event_type.insert(&mut map, "type");
        let created = match &self.created {
            Created::Missing => None,
            Created::Null => Some(Value::Null),
            Created::Int(i) => Some(json!(i)),
            Created::Unsigned(u) => Some(json!(u)),
            Created::Float(f) => Some(json!(f)),
            Created::Text(s) => Some(json!(s)),
            Created::Bool(b) => Some(json!(b)),
        };
        if let Some(created) = created {
            map.insert("created".into(), created);
        }
        match &self.data {
            Data::Missing => {}
            Data::NotAnObject(s) => {
                map.insert("data".into(), s.value());
            }
            Data::NoObject => {
                map.insert("data".into(), json!({ "previous_attributes": {} }));
            }
            Data::ObjectNotAMap(s) => {
                map.insert("data".into(), json!({ "object": s.value() }));
            }
            Data::Object(object) => {
                map.insert("data".into(), json!({ "object": object.value() }));
            }
        }
        match &self.request {
            Request::Missing => {}
            Request::Null => {
                map.insert("request".into(), Value::Null);
            }
            Request::Legacy(id) => {
                map.insert("request".into(), json!(id));
            }
            Request::Object {
                id,
                idempotency_key,
            } => {
                let mut request = Map::new();
                request.insert("id".into(), json!(id));
                idempotency_key.insert(&mut request, "idempotency_key");
                map.insert("request".into(), Value::Object(request));
            }
        }
        Value::Object(map)
    }

    fn expected_created(&self) -> Option<i64> {
        match &self.created {
            Created::Int(i) => Some(*i),
            Created::Unsigned(u) => i64::try_from(*u).ok(),
            Created::Text(s) => s.parse().ok(),
            // 1.0 is a float in JSON, not an integer; NaN and infinities are written as null.
            Created::Float(_) | Created::Missing | Created::Null | Created::Bool(_) => None,
        }
    }
}

fn check_envelope(envelope: &Envelope) {
    let value = envelope.value();
    let text = serde_json::to_string(&value).expect("a Value always serialises");
    let event: Value = serde_json::from_str(&text).expect("serde_json reads what it writes");
    assert!(same_json(&event, &value), "{text}");
    let row = check_body(&text, &event);

    let id = envelope.id.as_str().filter(|s| !s.is_empty());
    let event_type = envelope.event_type.as_str();
    let created = envelope.expected_created();
    let (Some(id), Some(event_type), Some(created)) = (id, event_type, created) else {
        assert!(
            row.is_err(),
            "kept an envelope without id, type or created: {text}"
        );
        return;
    };
    let row = row.unwrap_or_else(|e| panic!("refused a valid envelope ({e}): {text}"));
    assert_eq!(row.event_id, id);
    assert_eq!(row.event_type, event_type);
    assert_eq!(row.event_created, created.saturating_mul(1000));

    let (target, customer) = match &envelope.data {
        Data::Object(object) => {
            let target = object.expected_target();
            let customer = match &target {
                Some(("customer", id)) => Some(id.clone()),
                _ => object.customer.expected(),
            };
            (target, customer)
        }
        _ => (None, None),
    };
    assert_eq!(
        row.object_type.as_deref(),
        target.as_ref().map(|(k, _)| *k),
        "{text}"
    );
    assert_eq!(row.object_id, target.map(|(_, id)| id), "{text}");
    assert_eq!(row.customer_id, customer, "{text}");

    let key = match &envelope.request {
        Request::Object {
            idempotency_key: StrField::Text(key),
            ..
        } => Some(key.as_str()),
        _ => None,
    };
    assert_eq!(row.idempotency_key.as_deref(), key, "{text}");
}
