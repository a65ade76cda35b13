//! Waiting for something that happens asynchronously (a watch delivers, an agent
//! reloads, a controller writes) without timed assertions: poll until it holds, for at
//! most a bound, and fail with what was awaited and the last error seen.
//!
//! The one helper every Kubernetes test and end-to-end scenario uses, so the wait
//! policy (a 100 ms poll, the bound named in the failure) is the same everywhere.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// How often [`eventually`] looks again.
pub const POLL: Duration = Duration::from_millis(100);

/// Polls `check` until it gives `Some`, at most `within`; an `Err` from `check` is
/// remembered (and reported on timeout) but does not end the wait.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    let mut last = String::new();
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last = format!(": last error {error:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?}{last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_first_value_and_reports_the_last_error_on_timeout() {
        let mut calls = 0;
        let value = eventually("third call", Duration::from_secs(5), || {
            calls += 1;
            let now = calls;
            async move { Ok((now == 3).then_some(now)) }
        })
        .await
        .unwrap();
        assert_eq!(value, 3);

        let error = eventually::<(), _, _>("never", Duration::from_millis(250), || async {
            bail!("backend down")
        })
        .await
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "never: not within 250ms: last error backend down"
        );
    }
}
