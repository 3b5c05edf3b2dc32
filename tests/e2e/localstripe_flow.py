"""Drives localstripe through the official `stripe` SDK, as customer success would through the
dashboard. Usage:
  localstripe_flow.py API_BASE setup TENANT_ID      -> prints {"customer","subscription","item"}
  localstripe_flow.py API_BASE change SUB ITEM PLAN -> moves the subscription item to PLAN
"""
import json
import sys

import stripe

stripe.api_key = "sk_test_e2e"
stripe.api_base = sys.argv[1]
command = sys.argv[2]

if command == "setup":
    tenant = sys.argv[3]
    for plan, amount in (("plan_basic", 1000), ("plan_pro", 5000)):
        stripe.Plan.create(id=plan, amount=amount, currency="eur", interval="month", product={"name": plan})
    card = stripe.Token.create(card={"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"})
    customer = stripe.Customer.create(
        email=f"{tenant}@example.test", name=f"Tenant {tenant}", metadata={"tenant_id": tenant}, source=card.id
    )
    subscription = stripe.Subscription.create(customer=customer.id, items=[{"plan": "plan_basic"}])
    print(json.dumps({
        "customer": customer.id,
        "subscription": subscription.id,
        "item": subscription["items"]["data"][0]["id"],
        "status": subscription.status,
    }))
elif command == "change":
    subscription, item, plan = sys.argv[3:6]
    changed = stripe.Subscription.modify(subscription, items=[{"id": item, "plan": plan}])
    print(json.dumps({"plan": changed["items"]["data"][0]["plan"]["id"]}))
else:
    sys.exit(f"unknown command {command}")
