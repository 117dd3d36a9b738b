//! Typed iptables rules. Rules are built from these values and rendered once, so a
//! malformed argument is a compile error rather than an `iptables-restore` failure, and
//! the only free text (comments) goes through one sanitizer.

use std::fmt::{self, Write as _};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::model::{Endpoint, Protocol};

/// The packet mark kube-proxy uses to flag connections for masquerade.
pub const MASQ_MARK: u32 = 0x4000;

/// A rule comment. Only characters that cannot end the quoted string or the line are
/// kept, so no input can inject iptables syntax (names are validated upstream too;
/// this is the second fence).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comment(String);

impl Comment {
    /// A comment from free text, with anything unsafe dropped.
    pub fn new(text: impl AsRef<str>) -> Self {
        let clean: String = text
            .as_ref()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || " ./:-_>;,[]()".contains(*c))
            .take(256)
            .collect();
        Self(clean)
    }
}

/// A packet match.
#[derive(Clone, Debug, PartialEq)]
pub enum Match {
    /// `-m comment --comment "C"`.
    Comment(Comment),
    /// `-m P -p P`.
    Protocol(Protocol),
    /// `-d IP`.
    Dst(IpAddr),
    /// `--dport N`.
    DstPort(u16),
    /// `-s NET`.
    Src(IpNetwork),
    /// `! -s NET`.
    NotSrc(IpNetwork),
    /// `-m addrtype --dst-type LOCAL`: to one of the node's addresses.
    DstTypeLocal,
    /// `-m addrtype --src-type LOCAL`: from one of the node's addresses.
    SrcTypeLocal,
    /// `-m statistic --mode random --probability p`.
    Probability(f64),
    /// `-m recent --name N --rcheck --seconds S --reap` (ClientIP affinity lookup).
    RecentCheck {
        /// The recent list (the endpoint's chain name).
        name: String,
        /// How long an entry pins the client to the endpoint.
        seconds: u32,
    },
    /// `-m recent --name N --set` (ClientIP affinity record).
    RecentSet {
        /// The recent list (the endpoint's chain name).
        name: String,
    },
    /// `-m mark --mark M/M` (or `! --mark` when `negate`).
    Mark {
        /// The mark bits (also the mask).
        mark: u32,
        /// Match packets without the mark.
        negate: bool,
    },
    /// `-m conntrack --ctstate S`.
    CtState(&'static str),
    /// `-d NET`.
    DstNet(IpNetwork),
    /// `-m conntrack ! --ctstate S`.
    NotCtState(&'static str),
    /// `-i IFACE` (a `+` suffix matches a prefix).
    InIface(String),
    /// `! -i IFACE`.
    NotInIface(String),
}

/// What a matching packet gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `-j CHAIN`.
    Jump(String),
    /// `-j ACCEPT`.
    Accept,
    /// `-j DROP`.
    Drop,
    /// `-j REJECT`.
    Reject,
    /// `-j RETURN`.
    Return,
    /// `-j DNAT --to-destination IP:PORT`.
    Dnat(Endpoint),
    /// `-j MARK --or-mark M`.
    OrMark(u32),
    /// `-j MARK --xor-mark M`.
    XorMark(u32),
    /// `-j MASQUERADE --random-fully`.
    Masquerade,
    /// No target: the rule only counts (kube-proxy's end-of-firewall-chain marker).
    CountOnly,
}

/// One rule of a chain; [`super::payload`] writes it as an `-A`, `-I` or `-D` line.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// The chain it belongs to.
    pub chain: String,
    /// Its matches, in order.
    pub matches: Vec<Match>,
    /// What a matching packet gets.
    pub target: Target,
}

impl Rule {
    /// A rule matching every packet (add matches with [`Rule::with`]).
    pub fn new(chain: impl Into<String>, target: Target) -> Self {
        Self {
            chain: chain.into(),
            matches: Vec::new(),
            target,
        }
    }

    /// Adds a match (builder style).
    pub fn with(mut self, m: Match) -> Self {
        self.matches.push(m);
        self
    }

    /// Adds a comment match.
    pub fn comment(self, text: impl AsRef<str>) -> Self {
        self.with(Match::Comment(Comment::new(text)))
    }

    /// The rule's arguments after `-A CHAIN` (also what `-D`/`-I` take).
    pub fn spec(&self) -> String {
        let mut out = String::new();
        for m in &self.matches {
            write_match(&mut out, m);
        }
        out.push_str(&self.target.to_string());
        out.truncate(out.trim_end().len());
        out
    }
}

fn write_match(out: &mut String, m: &Match) {
    // `write!` into a String cannot fail.
    let _ = match m {
        Match::Comment(Comment(text)) => write!(out, "-m comment --comment \"{text}\" "),
        Match::Protocol(p) => write!(out, "-m {0} -p {0} ", p.lower()),
        Match::Dst(ip) => write!(out, "-d {ip} "),
        Match::DstPort(port) => write!(out, "--dport {port} "),
        Match::Src(net) => write!(out, "-s {net} "),
        Match::NotSrc(net) => write!(out, "! -s {net} "),
        Match::DstTypeLocal => write!(out, "-m addrtype --dst-type LOCAL "),
        Match::SrcTypeLocal => write!(out, "-m addrtype --src-type LOCAL "),
        Match::Probability(p) => write!(out, "-m statistic --mode random --probability {p:.10} "),
        Match::RecentCheck { name, seconds } => {
            write!(
                out,
                "-m recent --name {name} --rcheck --seconds {seconds} --reap "
            )
        }
        Match::RecentSet { name } => write!(out, "-m recent --name {name} --set "),
        Match::Mark { mark, negate } => {
            let not = if *negate { "! " } else { "" };
            write!(out, "-m mark {not}--mark {mark:#x}/{mark:#x} ")
        }
        Match::CtState(state) => write!(out, "-m conntrack --ctstate {state} "),
        Match::DstNet(net) => write!(out, "-d {net} "),
        Match::NotCtState(state) => write!(out, "-m conntrack ! --ctstate {state} "),
        Match::InIface(iface) => write!(out, "-i {iface} "),
        Match::NotInIface(iface) => write!(out, "! -i {iface} "),
    };
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Jump(chain) => write!(f, "-j {chain}"),
            Self::Accept => f.write_str("-j ACCEPT"),
            Self::Drop => f.write_str("-j DROP"),
            Self::Reject => f.write_str("-j REJECT"),
            Self::Return => f.write_str("-j RETURN"),
            Self::Dnat(backend) => write!(f, "-j DNAT --to-destination {backend}"),
            Self::OrMark(mark) => write!(f, "-j MARK --or-mark {mark:#x}"),
            Self::XorMark(mark) => write!(f, "-j MARK --xor-mark {mark:#x}"),
            Self::Masquerade => f.write_str("-j MASQUERADE --random-fully"),
            Self::CountOnly => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_kube_proxy() {
        let rule = Rule::new("KUBE-SERVICES", Target::Jump("KUBE-SVC-ABC".into()))
            .comment("ns/web:http cluster IP")
            .with(Match::Protocol(Protocol::Tcp))
            .with(Match::Dst("10.96.0.10".parse().unwrap()))
            .with(Match::DstPort(80));
        assert_eq!(
            rule.spec(),
            "-m comment --comment \"ns/web:http cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-ABC"
        );
    }

    #[test]
    fn comments_cannot_inject() {
        let c = Comment::new("a\" -j ACCEPT\n-A INPUT -j DROP #");
        assert_eq!(c.0, "a -j ACCEPT-A INPUT -j DROP ");
        assert!(!c.0.contains('"') && !c.0.contains('\n'));
    }

    #[test]
    fn marks_and_probability() {
        let rule = Rule::new("X", Target::Return).with(Match::Mark {
            mark: MASQ_MARK,
            negate: true,
        });
        assert_eq!(rule.spec(), "-m mark ! --mark 0x4000/0x4000 -j RETURN");
        let rule = Rule::new("X", Target::Jump("Y".into())).with(Match::Probability(1.0 / 3.0));
        assert_eq!(
            rule.spec(),
            "-m statistic --mode random --probability 0.3333333333 -j Y"
        );
    }
}
