#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/*/seed-*): `python3 fuzz/make_seeds.py [fixtures3.json]`.

Envelopes are built from Stripe's own example objects (stripe/openapi's fixtures3.json, MIT;
shared/stripe/ in this workplace). Signature seeds are `<Stripe-Signature header>\n<body>`,
signed as Stripe signs, with the secret and clock the stripe_signature target uses.
"""
import copy
import hashlib
import hmac
import json
import os
import sys

FUZZ = os.path.dirname(os.path.abspath(__file__))
FIXTURES = sys.argv[1] if len(sys.argv) > 1 else os.path.join(FUZZ, "../../shared/stripe/fixtures3.json")
R = json.load(open(FIXTURES))["resources"]
SECRET = b"whsec_billsync_fuzz"
OLD = b"whsec_rotated_old"
NOW = 1700000000

def sig(secret, t, body):
    return hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()

# --- stripe_signature: "<header>\n<body>" -------------------------------------------------
d = f"{FUZZ}/corpus/stripe_signature"
body = json.dumps({"id": "evt_1", "object": "event", "type": "invoice.paid", "created": NOW}, separators=(",", ":")).encode()
v1 = sig(SECRET, NOW, body)
v1_old = sig(OLD, NOW, body)
v0 = hashlib.sha256(b"legacy").hexdigest()
seeds = {
    "seed-valid": f"t={NOW},v1={v1}",
    "seed-valid-with-v0": f"t={NOW},v1={v1},v0={v0}",
    "seed-rotation-two-v1": f"t={NOW},v1={v1_old},v1={v1}",
    "seed-rotation-wrong-first": f"t={NOW},v1={'0'*64},v1={v1}",
    "seed-reordered-spaces": f" v1={v1} , t={NOW} ",
    "seed-uppercase-hex": f"t={NOW},v1={v1.upper()}",
    "seed-future-scheme": f"t={NOW},v2=abc,v1={v1},x=1",
    "seed-stale": f"t={NOW-301},v1={sig(SECRET, NOW-301, body)}",
    "seed-mismatch": f"t={NOW},v1={'ab'*32}",
    "seed-short-v1": f"t={NOW},v1=abcd",
    "seed-no-timestamp": f"v1={v1}",
    "seed-no-v1": f"t={NOW},v0={v0}",
    "seed-bad-timestamp": f"t=17e8,v1={v1}",
    "seed-garbage": "t=,v1=,=,,,t,v1,==,\u00e9=\u00e9",
    "seed-empty": "",
}
for name, header in seeds.items():
    open(f"{d}/{name}", "wb").write(header.encode() + b"\n" + body)
# A body that is not JSON, signed.
odd = b"\x00\xff not json \n\r"
open(f"{d}/seed-binary-body", "wb").write(f"t={NOW},v1={sig(SECRET, NOW, odd)}".encode() + b"\n" + odd)
# A real Stripe-sized event body.
big = json.dumps({"id": "evt_2", "object": "event", "type": "customer.subscription.updated", "created": NOW,
                  "data": {"object": R["subscription"]}}, separators=(",", ":")).encode()
open(f"{d}/seed-valid-large-body", "wb").write(f"t={NOW},v1={sig(SECRET, NOW, big)}".encode() + b"\n" + big)

# --- event_envelope: webhook bodies -------------------------------------------------------
d = f"{FUZZ}/corpus/event_envelope"
def event(evt_id, typ, obj, created=NOW, request=None, prev=None, api_version="2025-06-30.basil", **extra):
    e = {"id": evt_id, "object": "event", "api_version": api_version, "created": created,
         "data": {"object": obj}, "livemode": False, "pending_webhooks": 1,
         "request": request if request is not None else {"id": "req_abc", "idempotency_key": None},
         "type": typ}
    if prev is not None:
        e["data"]["previous_attributes"] = prev
    e.update(extra)
    return e
def write(name, e):
    open(f"{d}/seed-{name}.json", "w").write(json.dumps(e, indent=2) + "\n")

write("plan.created-fixture", R["event"])  # Stripe's own event fixture, unchanged
sub = copy.deepcopy(R["subscription"])
write("customer.subscription.updated", event("evt_sub_upd", "customer.subscription.updated", sub,
      prev={"status": "trialing", "items": {"object": "list", "data": []}}))
write("invoice.paid", event("evt_inv_paid", "invoice.paid", copy.deepcopy(R["invoice"])))
write("customer.updated-own-command", event("evt_cus_upd", "customer.updated", copy.deepcopy(R["customer"]),
      request={"id": "req_1", "idempotency_key": "billsync-cmd-42"}))
write("customer.deleted-stub", event("evt_cus_del", "customer.deleted",
      {"id": R["customer"]["id"], "object": "customer", "deleted": True}))
write("entitlements.summary.updated", event("evt_ent", "entitlements.active_entitlement_summary.updated",
      copy.deepcopy(R["entitlements.active_entitlement_summary"])))
write("charge.refund.updated", event("evt_ref", "charge.refund.updated", copy.deepcopy(R["refund"])))
write("credit_note.created", event("evt_cn", "credit_note.created", copy.deepcopy(R["credit_note"])))
inv_expanded = copy.deepcopy(R["invoice"]); inv_expanded["customer"] = copy.deepcopy(R["customer"])
write("invoice.finalized-expanded-customer", event("evt_inv_exp", "invoice.finalized", inv_expanded))
write("unknown-type", event("evt_unknown", "widget.frobbed", {"id": "wid_1", "object": "widget", "customer": "cus_9"}))
write("billing.meter.created-unmirrored", event("evt_meter", "billing.meter.created", copy.deepcopy(R["billing.meter"])))
# Legacy (API 2017-08-15, localstripe): bare request id, plan instead of price.
legacy_sub = {"id": "sub_legacy", "object": "subscription", "customer": "cus_legacy", "status": "active",
              "plan": {"id": "gold", "object": "plan", "amount": 2000, "currency": "usd", "interval": "month"},
              "items": {"object": "list", "data": [{"id": "si_1", "object": "subscription_item",
                        "plan": {"id": "gold", "object": "plan"}, "quantity": 1}]}}
write("legacy-2017-subscription.created", event("evt_legacy", "customer.subscription.created", legacy_sub,
      api_version="2017-08-15", request="req_legacy"))
write("legacy-null-request", event("evt_legacy2", "invoice.payment_succeeded",
      {"id": "in_legacy", "object": "invoice", "customer": "cus_legacy", "subscription": "sub_legacy"},
      api_version="2017-08-15", request=None) | {"request": None})
write("odd-created-as-string", event("evt_str_created", "customer.created",
      {"id": "cus_str", "object": "customer"}, created=str(NOW)))
# Refused: no id, empty id, no type, float created, not an object.
write("refused-no-id", {k: v for k, v in event("x", "customer.created", {"id": "cus_1", "object": "customer"}).items() if k != "id"})
write("refused-empty-id", event("", "customer.created", {"id": "cus_1", "object": "customer"}))
write("refused-float-created", event("evt_f", "customer.created", {"id": "cus_1", "object": "customer"}, created=1.7e9))
open(f"{d}/seed-refused-array.json", "w").write('[{"id":"evt_1","type":"x","created":1}]\n')
open(f"{d}/seed-refused-not-json.txt", "w").write('{"id": "evt_1", "type": \n')
