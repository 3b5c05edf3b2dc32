//! `billsync config check` and `billsync healthcheck`: no database, no runtime of their own
//! beyond what one HTTP request needs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::catalog::Catalog;
use crate::config::Settings;
use crate::entitlements::PlanCatalog;

/// Validates the configuration and the catalog it names; prints the effective configuration,
/// secrets redacted. Exit 0 when valid, 2 with the error when not.
pub(super) fn config(file: Option<&Path>) -> ExitCode {
    let (settings, shown) = match Settings::load_shown(file) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("billsync: {error}");
            return ExitCode::from(2);
        }
    };
    let path = &settings.catalog.path;
    let catalog = match Catalog::load(path, settings.catalog.required) {
        Ok(catalog) => catalog,
        Err(error) => {
            eprintln!("billsync: {error}");
            return ExitCode::from(2);
        }
    };
    if let Err(message) = PlanCatalog::from_catalog(&catalog) {
        eprintln!("billsync: catalog {}: {message}", path.display());
        return ExitCode::from(2);
    }
    println!("# billsync configuration: valid; secrets redacted");
    println!(
        "# catalog {}: {} meter(s), {} feature(s), {} plan(s)",
        path.display(),
        catalog.meters.len(),
        catalog.features.len(),
        catalog.plans.len()
    );
    print!("{shown}");
    ExitCode::SUCCESS
}

/// `/readyz` on the address `listen` binds; an unspecified address (0.0.0.0, ::) is asked on
/// loopback.
pub(super) fn readyz_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}/readyz", SocketAddr::new(ip, listen.port()))
}

/// GETs `url`: exit 0 on a 2xx answer within `timeout`, 1 otherwise, with one line saying why.
pub(super) fn health(url: &str, timeout: Duration) -> ExitCode {
    crate::state::init_crypto();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("billsync: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let answer = runtime.block_on(async {
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        client.get(url).send().await
    });
    match answer {
        Ok(response) if response.status().is_success() => {
            println!("billsync healthcheck: {url} answered {}", response.status());
            ExitCode::SUCCESS
        }
        Ok(response) => {
            eprintln!("billsync healthcheck: {url} answered {}", response.status());
            ExitCode::FAILURE
        }
        Err(error) => {
            let why = if error.is_timeout() {
                format!("no answer within {timeout:?}")
            } else {
                // reqwest's own text is "error sending request"; the cause is further down.
                let mut why = error.to_string();
                let mut source = std::error::Error::source(&error);
                while let Some(cause) = source {
                    why = format!("{why}: {cause}");
                    source = cause.source();
                }
                why
            };
            eprintln!("billsync healthcheck: {url}: {why}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_listen_address_is_asked_on_loopback() {
        let url = |listen: &str| readyz_url(listen.parse().unwrap());
        assert_eq!(url("0.0.0.0:8080"), "http://127.0.0.1:8080/readyz");
        assert_eq!(url("[::]:9000"), "http://[::1]:9000/readyz");
        assert_eq!(url("10.0.0.5:80"), "http://10.0.0.5:80/readyz");
    }
}
