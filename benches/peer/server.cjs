// The peer of `cargo bench --bench peer`: @supabase/stripe-sync-engine (installed by the bench
// under target/peer) behind a bare node:http server, as its README shows it used: POST /webhooks
// hands the raw body and the Stripe-Signature header to StripeSync.processWebhook, which checks
// the signature and upserts the event's object; 200 when it is stored, 400 otherwise.
//
// Env: DATABASE_URL, STRIPE_WEBHOOK_SECRET, PORT, POOL_MAX (default 10).
// No Stripe key and no revalidateObjectsViaStripeApi: the engine stores the webhook's own copy
// and never calls Stripe (the same as billsync with stripe.refetch = false).
const http = require('node:http');
const { StripeSync, runMigrations } = require('@supabase/stripe-sync-engine');

async function main() {
  const databaseUrl = process.env.DATABASE_URL;
  await runMigrations({ databaseUrl, schema: 'stripe' });
  const sync = new StripeSync({
    poolConfig: { connectionString: databaseUrl, max: Number(process.env.POOL_MAX || 10) },
    stripeSecretKey: 'sk_test_peer_bench',
    stripeWebhookSecret: process.env.STRIPE_WEBHOOK_SECRET,
  });
  const server = http.createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/health') {
      res.writeHead(200).end('ok');
      return;
    }
    if (req.method !== 'POST' || req.url !== '/webhooks') {
      res.writeHead(404).end();
      return;
    }
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      sync
        .processWebhook(Buffer.concat(chunks), req.headers['stripe-signature'])
        .then(() => {
          res.writeHead(200, { 'content-type': 'application/json' });
          res.end('{"received":true}');
        })
        .catch((error) => {
          res.writeHead(400, { 'content-type': 'application/json' });
          res.end(JSON.stringify({ error: String(error && error.message) }));
        });
    });
  });
  server.listen(Number(process.env.PORT), '127.0.0.1', () => console.log('listening'));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
