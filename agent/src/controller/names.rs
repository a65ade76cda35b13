//! Deterministic names for the objects `detour controller` writes: mirrored
//! EndpointSlices and the VIP Service of a FailoverService.
//!
//! Invariants:
//! - a name depends only on what it names (cluster, namespace, Service, region, or the
//!   FailoverService's name), so a restarted controller finds its own objects again;
//! - every name is a valid RFC 1035 label (which is also a valid RFC 1123 label and DNS
//!   subdomain) of at most 63 characters; when the readable form does not fit or had to
//!   be altered, it is truncated and ends in 8 hex digits of the sha256 of the readable
//!   form, so two different inputs still get different names.

use sha2::{Digest as _, Sha256};

/// Longest Kubernetes name (and label value) written here.
pub const MAX_NAME: usize = 63;
/// Hex digits of the hash appended to an altered name.
const HASH_LEN: usize = 8;

/// The name of a mirrored EndpointSlice: `detour-<cluster>-<namespace>-<service>-<group>`,
/// where `group` is the region (`none` when unknown), with a suffix when a region needs
/// more than one slice.
#[must_use]
pub fn mirror_slice(cluster: &str, namespace: &str, service: &str, group: &str) -> String {
    dns_label(&format!("detour-{cluster}-{namespace}-{service}-{group}"))
}

/// The name of the selectorless Service that gives a FailoverService its VIP.
#[must_use]
pub fn vip_service(failover_service: &str) -> String {
    dns_label(&format!("{failover_service}-failover"))
}

/// A label value naming `value` (a FailoverService's name may be longer than a label
/// value may be): `value` itself when it fits, else truncated with a hash.
#[must_use]
pub fn label_value(value: &str) -> String {
    if value.len() <= MAX_NAME {
        value.to_owned()
    } else {
        dns_label(value)
    }
}

/// Short hex digest of `input`, for names that must differ when their inputs do.
#[must_use]
pub fn short_hash(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    digest
        .iter()
        .take(HASH_LEN / 2)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `readable` as an RFC 1035 label: lowercase, `[a-z0-9-]`, starting with a letter,
/// ending with a letter or digit, at most 63 characters; truncated and hashed when it
/// had to change.
fn dns_label(readable: &str) -> String {
    let mut name: String = readable
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-') => c,
            _ => '-',
        })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        name.insert(0, 'x');
    }
    let valid_end = name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if name == readable && name.len() <= MAX_NAME && valid_end {
        return name;
    }
    // Room for "-" and the hash; the hash ends the name, so it ends alphanumeric.
    name.truncate(MAX_NAME - HASH_LEN - 1);
    format!("{name}-{}", short_hash(readable))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn is_rfc1035_label(s: &str) -> bool {
        s.len() <= MAX_NAME
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    }

    #[test]
    fn short_readable_names_are_kept_as_they_are() {
        assert_eq!(
            mirror_slice("kind2", "default", "reviews", "us-east1"),
            "detour-kind2-default-reviews-us-east1"
        );
        assert_eq!(vip_service("reviews"), "reviews-failover");
        assert_eq!(label_value("reviews"), "reviews");
    }

    #[test]
    fn long_or_altered_names_are_truncated_and_hashed_and_stay_distinct() {
        let long = "a".repeat(63);
        let a = mirror_slice("kind2", "default", &long, "none");
        let b = mirror_slice("kind2", "default", &long, "us-east1");
        assert_eq!(a.len(), MAX_NAME);
        assert!(is_rfc1035_label(&a), "{a}");
        assert_ne!(a, b);
        // A FailoverService name may hold dots and start with a digit.
        let vip = vip_service("1reviews.v2");
        assert!(is_rfc1035_label(&vip), "{vip}");
        assert!(vip.starts_with("x1reviews-v2-failover-"), "{vip}");
        // Upper case in a region label value.
        let upper = mirror_slice("kind2", "default", "reviews", "US_East");
        assert!(is_rfc1035_label(&upper), "{upper}");
        assert_ne!(
            upper,
            mirror_slice("kind2", "default", "reviews", "us-east")
        );
    }

    proptest! {
        #[test]
        fn every_name_is_an_rfc1035_label(
            cluster in "[a-z0-9-]{1,63}",
            namespace in "[a-z0-9-]{1,63}",
            service in "[a-z0-9-]{1,63}",
            region in "[A-Za-z0-9._-]{0,63}",
        ) {
            let name = mirror_slice(&cluster, &namespace, &service, &region);
            prop_assert!(is_rfc1035_label(&name), "{}", name);
            let vip = vip_service(&format!("{service}.{region}"));
            prop_assert!(is_rfc1035_label(&vip), "{}", vip);
        }
    }
}
