//! Kubernetes name rules. Everything the agent later writes into the kernel (iptables
//! comments, DNS names) comes from names that passed these checks, so a manifest can
//! never smuggle rule text or odd bytes through a name.

/// Why an object is invalid: the field, named as the API server names it
/// (`spec.ports[1].nodePort`), and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    pub field: String,
    pub problem: Problem,
}

/// What is wrong with a field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A required field is absent.
    Missing,
    /// The value breaks a rule; the text says which.
    Invalid(String),
}

impl ValidationError {
    /// `field` is required but absent.
    pub fn missing(field: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: Problem::Missing,
        }
    }

    /// `field` holds a value that breaks a rule.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: Problem::Invalid(reason.into()),
        }
    }
}

impl std::fmt::Display for ValidationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.problem {
            Problem::Missing => write!(f, "{} is missing", self.field),
            Problem::Invalid(reason) => write!(f, "{}: {reason}", self.field),
        }
    }
}

/// Names the field a rule check was about: `check(value).at("spec.type")?`.
pub trait At<T> {
    /// Turns a rule violation into a [`ValidationError`] for `field`.
    fn at(self, field: impl Into<String>) -> Result<T, ValidationError>;
}

impl<T> At<T> for Result<T, String> {
    fn at(self, field: impl Into<String>) -> Result<T, ValidationError> {
        self.map_err(|reason| ValidationError::invalid(field, reason))
    }
}

/// RFC 1123 label: namespaces, endpoint hostnames.
pub fn dns1123_label(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("{value:?} is not a valid DNS-1123 label"))
    }
}

/// RFC 1035 label: Service names (must also start with a letter).
pub fn dns1035_label(value: &str) -> Result<(), String> {
    dns1123_label(value)?;
    if value.starts_with(|c: char| c.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err(format!("{value:?} is not a valid DNS-1035 label"))
    }
}

/// RFC 1123 subdomain: object names such as EndpointSlices and Nodes.
pub fn dns1123_subdomain(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 253 {
        return Err(format!("{value:?} is not a valid DNS-1123 subdomain"));
    }
    value
        .split('.')
        .try_for_each(dns1123_label)
        .map_err(|_| format!("{value:?} is not a valid DNS-1123 subdomain"))
}

/// IANA service name: port names (at most 15 characters, at least one letter, no
/// leading, trailing or doubled hyphen).
pub fn port_name(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 15
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && value.bytes().any(|b| b.is_ascii_lowercase())
        && !value.starts_with('-')
        && !value.ends_with('-')
        && !value.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!("{value:?} is not a valid port name"))
    }
}

/// A DNS name that an ExternalName service may point at (lower or upper case letters,
/// digits, hyphens, dots; optional trailing dot).
pub fn external_name(value: &str) -> Result<(), String> {
    let trimmed = value.strip_suffix('.').unwrap_or(value);
    let ok = !trimmed.is_empty()
        && trimmed.len() <= 253
        && trimmed.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{value:?} is not a valid DNS name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(dns1123_label("kube-system").is_ok());
        assert!(dns1123_label("0abc").is_ok());
        assert!(dns1123_label("").is_err());
        assert!(dns1123_label("-a").is_err());
        assert!(dns1123_label("a-").is_err());
        assert!(dns1123_label("A").is_err());
        assert!(dns1123_label(&"a".repeat(64)).is_err());
        assert!(dns1123_label("a\" -j ACCEPT").is_err());
        assert!(dns1035_label("0abc").is_err());
        assert!(dns1035_label("web").is_ok());
    }

    #[test]
    fn subdomains() {
        assert!(dns1123_subdomain("web-abc12").is_ok());
        assert!(dns1123_subdomain("node-1.example.com").is_ok());
        assert!(dns1123_subdomain("a..b").is_err());
        assert!(dns1123_subdomain("a\nb").is_err());
    }

    #[test]
    fn port_names() {
        assert!(port_name("http").is_ok());
        assert!(port_name("h2c-8080").is_ok());
        assert!(port_name("8080").is_err());
        assert!(port_name("a--b").is_err());
        assert!(port_name("averyveryverylongname").is_err());
        assert!(port_name("x\n-A").is_err());
    }

    #[test]
    fn external_names() {
        assert!(external_name("example.com").is_ok());
        assert!(external_name("example.com.").is_ok());
        assert!(external_name("my_host.Example.COM").is_ok());
        assert!(external_name("a b").is_err());
        assert!(external_name("").is_err());
    }
}
