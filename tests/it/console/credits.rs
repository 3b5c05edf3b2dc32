//! The tenant page's credits in a real browser: balances per unit (granted, burned,
//! available), the low-balance settings with the alarm's state, and the tenant's latest
//! notifications, both kinds, after a crossing whose top-up Stripe declined (the wiremock
//! Stripe and receiver of `topup.rs`).

use serde_json::json;

use super::{Browser, Driver, chromedriver, screenshots};
use crate::credits::{deliver_grant, grant, now, usd};
use crate::helpers::{API_KEY, Backend, wait_for};
use crate::topup::{auto_top_up, world_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_page_shows_credit_balances_settings_and_notifications() {
    std::fs::create_dir_all(screenshots()).expect("screenshot folder");
    let Some(binary) = chromedriver() else {
        std::fs::write(screenshots().join("SKIPPED"), "chromedriver not found\n")
            .expect("skip marker");
        eprintln!("SKIPPED: chromedriver not found; the credits page's browser test did not run");
        return;
    };
    let w = world_with(Backend::Sqlite, 0, &[], |_| {}).await;
    w.stripe.lock().unwrap().decline = true;
    // $10.00 granted; a threshold of 500 cents with auto top-up of 2000.
    let g = grant("credgr_console", "cus_acme", usd(1000), json!({}));
    deliver_grant(&w.app, "acme", "billing.credit_grant.created", now(), g).await;
    auto_top_up(&w.app).await;
    // 30,000 GPU seconds at 0.0167 cents: 501 cents, leaving 499, below 500.
    let body = json!({"feature": "gpu_minutes", "quantity": 30000, "record": {"id": "g1"}});
    let burned = w.app.check_body("acme", body).await;
    assert_eq!(burned["recorded"], true, "{burned}");
    wait_for("both notifications delivered", || async {
        let page = w.app.get_json("/v1/notifications?status=delivered").await;
        page["data"].as_array().unwrap().len() == 2
    })
    .await;

    let driver = Driver::start(&binary).await;
    let browser = Browser {
        client: driver.session().await,
        base: w.app.url(""),
    };
    browser.open("").await;
    browser.sign_in(API_KEY).await;
    browser.text("#sync-cards").await;
    browser.open("#/tenants/acme").await;
    let balances = browser
        .text_until("#credit-balances tbody", |t| t.contains("USD"))
        .await;
    for figure in ["1000", "501", "499"] {
        assert!(balances.contains(figure), "{figure} in {balances}");
    }
    let settings = browser.text("#credit-settings tbody").await;
    assert!(
        settings.contains("500") && settings.contains("2000"),
        "{settings}"
    );
    assert!(
        settings.contains("crossed") && settings.contains("on"),
        "{settings}"
    );
    let notes = browser.text("#notifications tbody").await;
    assert!(notes.contains("credits.balance_low"), "{notes}");
    assert!(notes.contains("usd: 1000 → 499, below 500"), "{notes}");
    assert!(notes.contains("credits.top_up_failed"), "{notes}");
    assert!(notes.contains("card_declined"), "{notes}");
    assert_eq!(notes.matches("delivered").count(), 2, "{notes}");
    browser.screenshot("10-tenant-credits").await;
    browser.client.close().await.expect("end the session");
    w.app.stop().await;
}
