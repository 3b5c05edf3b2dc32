//! The Stripe client, built from configuration.

use std::time::Duration;

use crate::config::StripeSettings;

/// A configured Stripe client, or `None` when no API key is set (vendor sync off).
pub fn client(
    settings: &StripeSettings,
) -> Result<Option<::stripe::Client>, ::stripe::StripeError> {
    let Some(key) = &settings.api_key else {
        return Ok(None);
    };
    let client = ::stripe::ClientBuilder::new(key.expose())
        .url(settings.api_base.clone())
        .timeout(Duration::from_secs(30))
        .app_info("billsync", Some(env!("CARGO_PKG_VERSION").to_owned()), None)
        .build()?;
    Ok(Some(client))
}
