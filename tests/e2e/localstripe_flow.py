"""Drives localstripe through the official `stripe` SDK, as customer success would through the
dashboard. Usage:
  localstripe_flow.py API_BASE setup TENANT_ID      -> prints {"customer","subscription","item"}
  localstripe_flow.py API_BASE change SUB ITEM PLAN -> moves the subscription item to PLAN
  localstripe_flow.py API_BASE plans                -> creates plan_basic and plan_pro
  localstripe_flow.py API_BASE card CUSTOMER        -> gives the customer a working card
  localstripe_flow.py API_BASE customer CUSTOMER    -> prints the customer
  localstripe_flow.py API_BASE subscriptions CUSTOMER -> prints the customer's subscriptions
"""
import json
import sys

import stripe

stripe.api_key = "sk_test_e2e"
stripe.api_base = sys.argv[1]
command = sys.argv[2]


def create_plans():
    for plan, amount in (("plan_basic", 1000), ("plan_pro", 5000)):
        stripe.Plan.create(id=plan, amount=amount, currency="eur", interval="month", product={"name": plan})


if command == "setup":
    tenant = sys.argv[3]
    create_plans()
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
elif command == "plans":
    create_plans()
    print(json.dumps({"plans": ["plan_basic", "plan_pro"]}))
elif command == "card":
    card = stripe.Token.create(card={"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"})
    source = stripe.Customer.create_source(sys.argv[3], source=card.id)
    print(json.dumps({"source": source.id}))
elif command == "customer":
    print(json.dumps(stripe.Customer.retrieve(sys.argv[3]).to_dict()))
elif command == "subscriptions":
    subscriptions = stripe.Subscription.list(customer=sys.argv[3], status="all")
    print(json.dumps([s.to_dict() for s in subscriptions.data]))
else:
    sys.exit(f"unknown command {command}")
