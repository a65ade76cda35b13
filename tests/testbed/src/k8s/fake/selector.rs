//! `labelSelector` and `fieldSelector` query parameters, parsed the way kube-apiserver
//! reads them, and matched against stored objects.
//!
//! Label selectors are parsed into kube's own [`Expression`]s and matched with its
//! [`SelectorExt`], so the fake and kube agree on what a selector means. Field selectors
//! support what every resource supports: `metadata.name` and `metadata.namespace` with
//! `=`, `==` and `!=`; any other field is refused, as kube-apiserver refuses fields a
//! resource does not index.

use std::collections::{BTreeMap, BTreeSet};

use kube::core::{Expression, Selector, SelectorExt as _};
use serde_json::Value;

/// A parsed selector, or why it could not be parsed (the message a 400 carries).
pub type Parsed<T> = Result<T, String>;

/// Parses a `labelSelector`: comma-separated requirements `k`, `!k`, `k=v`, `k==v`,
/// `k!=v`, `k in (a,b)`, `k notin (a,b)`.
pub fn parse_labels(text: &str) -> Parsed<Selector> {
    split_requirements(text)?
        .into_iter()
        .map(|requirement| parse_requirement(&requirement))
        .collect()
}

/// Splits at commas outside parentheses.
fn split_requirements(text: &str) -> Parsed<Vec<String>> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut depth = 0u32;
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("unbalanced ')' in label selector {text:?}"))?
            }
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if depth != 0 {
        return Err(format!("unbalanced '(' in label selector {text:?}"));
    }
    parts.push(current);
    Ok(parts
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect())
}

fn parse_requirement(requirement: &str) -> Parsed<Expression> {
    let bad = || format!("invalid label selector requirement {requirement:?}");
    if let Some(key) = requirement.strip_prefix('!') {
        return Ok(Expression::DoesNotExist(checked_key(
            key.trim(),
            requirement,
        )?));
    }
    if let Some((key, value)) = requirement.split_once("!=") {
        return Ok(Expression::NotEqual(
            checked_key(key.trim(), requirement)?,
            value.trim().to_owned(),
        ));
    }
    if let Some((key, value)) = requirement
        .split_once("==")
        .or_else(|| requirement.split_once('='))
    {
        return Ok(Expression::Equal(
            checked_key(key.trim(), requirement)?,
            value.trim().to_owned(),
        ));
    }
    let words: Vec<&str> = requirement.splitn(2, char::is_whitespace).collect();
    match words.as_slice() {
        [key] => Ok(Expression::Exists(checked_key(key, requirement)?)),
        [key, rest] => {
            let rest = rest.trim();
            let (negate, set) = if let Some(set) = rest.strip_prefix("notin") {
                (true, set)
            } else if let Some(set) = rest.strip_prefix("in") {
                (false, set)
            } else {
                return Err(bad());
            };
            let values: BTreeSet<String> = set
                .trim()
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(bad)?
                .split(',')
                .map(|v| v.trim().to_owned())
                .collect();
            let key = checked_key(key, requirement)?;
            Ok(if negate {
                Expression::NotIn(key, values)
            } else {
                Expression::In(key, values)
            })
        }
        _ => Err(bad()),
    }
}

fn checked_key(key: &str, requirement: &str) -> Parsed<String> {
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(format!(
            "invalid label key {key:?} in requirement {requirement:?}"
        ));
    }
    Ok(key.to_owned())
}

/// One `fieldSelector` requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    field: String,
    value: String,
    equal: bool,
}

/// Parses a `fieldSelector`: comma-separated `field=value`, `field==value`,
/// `field!=value`, with `metadata.name` and `metadata.namespace` as fields.
pub fn parse_fields(text: &str) -> Parsed<Vec<FieldRequirement>> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|requirement| {
            let (field, value, equal) = if let Some((f, v)) = requirement.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = requirement
                .split_once("==")
                .or_else(|| requirement.split_once('='))
            {
                (f, v, true)
            } else {
                return Err(format!(
                    "invalid field selector requirement {requirement:?}"
                ));
            };
            let field = field.trim();
            if !matches!(field, "metadata.name" | "metadata.namespace") {
                return Err(format!(
                    "field label not supported: {field} (the fake API server knows \
                     metadata.name and metadata.namespace)"
                ));
            }
            Ok(FieldRequirement {
                field: field.to_owned(),
                value: value.trim().to_owned(),
                equal,
            })
        })
        .collect()
}

/// Which objects a list or watch returns.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `None`: every namespace (and cluster-scoped objects).
    pub namespace: Option<String>,
    pub labels: Selector,
    pub fields: Vec<FieldRequirement>,
}

impl Filter {
    pub fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        let text = |field: &str| meta[field].as_str().unwrap_or_default();
        if let Some(namespace) = &self.namespace {
            if text("namespace") != namespace {
                return false;
            }
        }
        let labels: BTreeMap<String, String> = meta["labels"]
            .as_object()
            .map(|map| {
                map.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        self.labels.matches(&labels)
            && self.fields.iter().all(|requirement| {
                let actual = match requirement.field.as_str() {
                    "metadata.name" => text("name"),
                    _ => text("namespace"),
                };
                (actual == requirement.value) == requirement.equal
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    fn selects(selector: &str, labels: Value) -> bool {
        Filter {
            labels: parse_labels(selector).unwrap(),
            ..Filter::default()
        }
        .matches(&labelled(labels))
    }

    #[test]
    fn label_selectors_mean_what_kube_apiserver_means() {
        let object = json!({"app": "reviews", "tier": "web"});
        assert!(selects("", object.clone()));
        assert!(selects("app=reviews", object.clone()));
        assert!(selects("app==reviews", object.clone()));
        assert!(!selects("app=ratings", object.clone()));
        assert!(selects("app!=ratings", object.clone()));
        assert!(
            selects("missing!=x", object.clone()),
            "!= holds without the key"
        );
        assert!(selects("tier", object.clone()));
        assert!(!selects("!tier", object.clone()));
        assert!(selects("!missing", object.clone()));
        assert!(selects("app in (ratings, reviews)", object.clone()));
        assert!(!selects("app in (ratings)", object.clone()));
        assert!(selects("app notin (ratings)", object.clone()));
        assert!(selects("missing notin (x)", object.clone()));
        assert!(!selects("missing in (x)", object.clone()));
        assert!(selects("app in (reviews,x),tier=web", object.clone()));
        assert!(!selects("app in (reviews,x),tier=db", object));
    }

    #[test]
    fn bad_label_selectors_are_refused_with_the_requirement() {
        for bad in ["app in reviews", "app in (x", "app)", "a b c", "=x"] {
            let error = parse_labels(bad).unwrap_err();
            assert!(error.contains("label"), "{bad}: {error}");
        }
    }

    #[test]
    fn field_selectors_match_name_and_namespace_only() {
        let object = labelled(json!({}));
        let filter = |text: &str| Filter {
            fields: parse_fields(text).unwrap(),
            ..Filter::default()
        };
        assert!(filter("metadata.name=a").matches(&object));
        assert!(!filter("metadata.name=b").matches(&object));
        assert!(filter("metadata.name!=b,metadata.namespace==ns").matches(&object));
        assert!(!filter("metadata.namespace!=ns").matches(&object));
        let error = parse_fields("spec.nodeName=x").unwrap_err();
        assert!(error.contains("spec.nodeName"), "{error}");
    }
}
