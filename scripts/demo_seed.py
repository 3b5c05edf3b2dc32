"""Seeds localstripe for scripts/demo through the official `stripe` SDK, as customer success
would in the dashboard: two plans, and customers that name their tenant in metadata, with
subscriptions; one pays with a card whose charges fail, so its first invoice stays open.
Usage: demo_seed.py STRIPE_API_BASE   (prints what it made as JSON)
"""
import json
import sys

import stripe

stripe.api_key = "sk_test_demo"
stripe.api_base = sys.argv[1]

for plan, amount in (("plan_basic", 1000), ("plan_pro", 5000)):
    stripe.Plan.create(id=plan, amount=amount, currency="eur", interval="month", product={"name": plan})

made = []
for tenant, name, plan, card in (
    ("acme", "Acme Inc.", "plan_pro", "4242424242424242"),
    ("globex", "Globex Corporation", "plan_basic", "4242424242424242"),
    ("initech", "Initech", "plan_basic", "4000000000000341"),  # attaches, then every charge fails
):
    token = stripe.Token.create(card={"number": card, "exp_month": 12, "exp_year": 2034, "cvc": "123"})
    customer = stripe.Customer.create(
        email=f"billing@{tenant}.example", name=name, metadata={"tenant_id": tenant}, source=token.id
    )
    subscription = stripe.Subscription.create(customer=customer.id, items=[{"plan": plan}])
    invoice = stripe.Invoice.retrieve(subscription.latest_invoice)
    made.append({"tenant": tenant, "customer": customer.id, "subscription": subscription.status,
                 "invoice": invoice.status})
print(json.dumps(made))
