//! The cluster DNS domain (`--cluster-domain`), validated and normalised once.

use std::fmt;

use super::validate;

/// A cluster domain such as `cluster.local`: lower case, no trailing dot, a valid
/// DNS-1123 subdomain. Everything that builds a name under it takes this type, so no
/// caller normalises the spelling itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterDomain(String);

impl ClusterDomain {
    /// Validates and normalises a domain as an operator may write it
    /// (`Cluster.Local.` is `cluster.local`).
    pub fn new(value: &str) -> Result<Self, String> {
        let normal = value.trim_end_matches('.').to_ascii_lowercase();
        validate::dns1123_subdomain(&normal)?;
        Ok(Self(normal))
    }

    /// The domain without a trailing dot: `cluster.local`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The zone apex, fully qualified: `cluster.local.`.
    pub fn apex(&self) -> String {
        format!("{}.", self.0)
    }
}

impl Default for ClusterDomain {
    fn default() -> Self {
        Self("cluster.local".into())
    }
}

impl fmt::Display for ClusterDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_and_trailing_dot() {
        let d = ClusterDomain::new("Corp.Local.").unwrap();
        assert_eq!(d.as_str(), "corp.local");
        assert_eq!(d.apex(), "corp.local.");
        assert!(ClusterDomain::new("bad domain").is_err());
        assert!(ClusterDomain::new("").is_err());
    }
}
