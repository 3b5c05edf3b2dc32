//! The async-stripe client, built from configuration. Reads do not use it: its typed responses
//! fail on older object shapes (legacy plans, localstripe's lists), so they go through
//! [`super::StripeHttp`]; it is kept for typed writes.

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, Settings};

    #[test]
    fn a_client_exists_only_with_a_key() {
        crate::app::init_crypto();
        let mut settings = Settings::from_toml("").unwrap().stripe;
        assert!(client(&settings).unwrap().is_none());
        settings.api_key = Some(Secret::new("sk_test_x"));
        settings.api_base = "http://127.0.0.1:12111".to_owned();
        assert!(client(&settings).unwrap().is_some());
    }
}
