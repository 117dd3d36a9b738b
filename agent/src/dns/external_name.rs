//! ExternalName answers as CoreDNS gives them (DNS spec 2.5's example): the CNAME
//! and, in the same answer, the target's records: chased through the cluster zone
//! when the target is in it, asked upstream when it is not. The chase is bounded, so
//! ExternalName services pointing at each other end.

use super::zone::{Outcome, QType, Rec};

/// CNAMEs followed for one answer, at most.
pub const MAX_CHASE: usize = 8;

/// Where a chase ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Chased {
    /// Everything is in `answers` (the target was in the zone, or nothing to chase).
    Done,
    /// The last CNAME points outside the zone, at this name (trailing dot).
    Outside(String),
}

/// Follows the CNAME that ends `answers` through `lookup` for `qtype`, appending the
/// records found (owned by their names).
pub fn chase(
    answers: &mut Vec<Rec>,
    qtype: QType,
    lookup: impl Fn(&str, QType) -> Outcome,
) -> Chased {
    if matches!(qtype, QType::Cname | QType::Any) {
        return Chased::Done;
    }
    for _ in 0..MAX_CHASE {
        let Some(Rec::Cname { target, .. }) = answers.last() else {
            return Chased::Done;
        };
        let target = target.to_ascii_lowercase();
        match lookup(&target, qtype) {
            Outcome::Answer { answers: more, .. } => {
                answers.extend(more.into_iter().map(|r| owned_by(r, &target)));
            }
            Outcome::Elsewhere => return Chased::Outside(target),
            _ => return Chased::Done,
        }
    }
    Chased::Done
}

/// `rec` with `owner` where it stood for the queried name.
fn owned_by(rec: Rec, owner: &str) -> Rec {
    let own = |o: Option<String>| o.or_else(|| Some(owner.to_owned()));
    match rec {
        Rec::Addr { owner: o, ip } => Rec::Addr { owner: own(o), ip },
        Rec::Srv { owner: o, srv } => Rec::Srv { owner: own(o), srv },
        Rec::Cname { owner: o, target } => Rec::Cname {
            owner: own(o),
            target,
        },
        Rec::Ptr { owner: o, target } => Rec::Ptr {
            owner: own(o),
            target,
        },
        Rec::Txt { owner: o, text } => Rec::Txt {
            owner: own(o),
            text,
        },
        Rec::Soa { owner: o } => Rec::Soa { owner: own(o) },
        Rec::Ns { owner: o, target } => Rec::Ns {
            owner: own(o),
            target,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cname(target: &str) -> Rec {
        Rec::Cname {
            owner: None,
            target: target.into(),
        }
    }

    #[test]
    fn in_zone_targets_are_chased_and_loops_end() {
        let lookup = |name: &str, _| match name {
            "db.ns.svc.cluster.local." => Outcome::Answer {
                answers: vec![Rec::Addr {
                    owner: None,
                    ip: "10.96.0.5".parse().unwrap(),
                }],
                additionals: vec![],
            },
            "a.ns.svc.cluster.local." => Outcome::Answer {
                answers: vec![cname("b.ns.svc.cluster.local.")],
                additionals: vec![],
            },
            "b.ns.svc.cluster.local." => Outcome::Answer {
                answers: vec![cname("a.ns.svc.cluster.local.")],
                additionals: vec![],
            },
            _ => Outcome::Elsewhere,
        };
        let mut answers = vec![cname("db.ns.svc.cluster.local.")];
        assert_eq!(chase(&mut answers, QType::A, lookup), Chased::Done);
        assert_eq!(
            answers[1],
            Rec::Addr {
                owner: Some("db.ns.svc.cluster.local.".into()),
                ip: "10.96.0.5".parse().unwrap()
            }
        );
        let mut looping = vec![cname("a.ns.svc.cluster.local.")];
        assert_eq!(chase(&mut looping, QType::A, lookup), Chased::Done);
        assert_eq!(looping.len(), 1 + MAX_CHASE, "bounded");
        let mut outside = vec![cname("www.example.com.")];
        assert_eq!(
            chase(&mut outside, QType::A, lookup),
            Chased::Outside("www.example.com.".into())
        );
        let mut asked_cname = vec![cname("db.ns.svc.cluster.local.")];
        assert_eq!(chase(&mut asked_cname, QType::Cname, lookup), Chased::Done);
        assert_eq!(asked_cname.len(), 1, "a CNAME question gets the CNAME only");
    }
}
