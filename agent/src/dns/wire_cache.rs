//! Encoded answers, reused for identical questions: the UDP fast path. A repeated
//! question is answered by copying the request's header id and question and appending
//! the stored bytes, without decoding or encoding any DNS structure.
//!
//! Safe because everything after the question depends only on the question (compared
//! case-insensitively), the client's buffer size and the zone generation (or, for
//! forwarded answers, a short expiry), and because answer names in the stored bytes
//! point back at the question by offset, so they echo the client's spelling.

use std::hash::BuildHasher as _;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use hashbrown::HashTable;

use super::CacheScope;
/// The general path a question takes when no stored answer fits it (the request
/// parser and the answer encoder both transports use), reachable from here for what
/// drives questions without a socket: the fuzz targets (`fuzz/`).
pub use super::request::{Parsed, encode as encode_answer, parse as parse_request};

/// Header flag bits copied from the request into a reused answer.
const RD: u16 = 0x0100;
const CD: u16 = 0x0010;

/// The parts of a request the fast path needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Question<'a> {
    /// The question section as sent (name + type + class).
    pub raw: &'a [u8],
    /// Request flags (second header word).
    pub flags: u16,
    /// The client's UDP buffer from EDNS, if it sent an OPT record.
    pub edns_payload: Option<u16>,
}

/// Reads a plain query (one question, no answer or authority records, at most an
/// OPT record); anything else returns `None` and takes the general path.
pub fn question(packet: &[u8]) -> Option<Question<'_>> {
    if packet.len() < 12 {
        return None;
    }
    let word = |i: usize| u16::from_be_bytes([packet[i], packet[i + 1]]);
    let flags = word(2);
    // QR=0, OPCODE=0.
    if flags & 0xf800 != 0 {
        return None;
    }
    if word(4) != 1 || word(6) != 0 || word(8) != 0 || word(10) > 1 {
        return None;
    }
    let mut i = 12;
    loop {
        let len = usize::from(*packet.get(i)?);
        if len == 0 {
            i += 1;
            break;
        }
        if len > 63 {
            return None; // compression or extended labels: not in a plain question
        }
        i += 1 + len;
    }
    let end = i + 4;
    if end > packet.len() {
        return None;
    }
    let raw = &packet[12..end];
    let edns_payload = if word(10) == 1 {
        // The OPT record: root name, type 41, class = payload size.
        let opt = packet.get(end..end + 11)?;
        // Version (opt[6]) other than 0 takes the general path, which answers BADVERS;
        // so do options that do not parse (FORMERR there).
        if opt[0] != 0 || u16::from_be_bytes([opt[1], opt[2]]) != 41 || opt[6] != 0 {
            return None;
        }
        let rdlen = usize::from(u16::from_be_bytes([opt[9], opt[10]]));
        if !options_well_formed(packet.get(end + 11..)?, rdlen) {
            return None;
        }
        Some(u16::from_be_bytes([opt[3], opt[4]]))
    } else {
        None
    };
    Some(Question {
        raw,
        flags,
        edns_payload,
    })
}

/// Whether `rest` is exactly `rdlen` bytes of EDNS options, each a code, a length
/// and that many bytes.
fn options_well_formed(rest: &[u8], rdlen: usize) -> bool {
    if rest.len() != rdlen {
        return false;
    }
    let mut i = 0;
    while i < rest.len() {
        let Some(len) = rest.get(i + 2..i + 4) else {
            return false;
        };
        i += 4 + usize::from(u16::from_be_bytes([len[0], len[1]]));
    }
    i == rest.len()
}

/// A question's name in wire form, shown in presentation form (for the query log:
/// only formatted when a line is written).
pub struct WireName<'a>(pub &'a [u8]);

impl std::fmt::Display for WireName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut rest = self.0;
        while let Some((&len, tail)) = rest.split_first() {
            let len = usize::from(len);
            if len == 0 || len > tail.len() {
                break;
            }
            for &b in &tail[..len] {
                match b {
                    b'.' | b'\\' => write!(f, "\\{}", b as char)?,
                    0x21..=0x7e => write!(f, "{}", b as char)?,
                    _ => write!(f, "\\{b:03}")?,
                }
            }
            f.write_str(".")?;
            rest = &tail[len..];
        }
        if self.0.first() == Some(&0) {
            f.write_str(".")?;
        }
        Ok(())
    }
}

/// The cache key of a question: its lower-cased name, its type and class as they
/// are (lower-casing those bytes would make types 65..90 collide with 97..122, e.g.
/// HTTPS with type 97), plus the answer size limit.
pub fn key(q: &Question<'_>, max_size: u16, out: &mut Vec<u8>) {
    out.clear();
    let (name, type_class) = q.raw.split_at(q.raw.len().saturating_sub(4));
    out.extend(name.iter().map(u8::to_ascii_lowercase));
    out.extend_from_slice(type_class);
    out.extend_from_slice(&max_size.to_be_bytes());
    out.push(u8::from(q.edns_payload.is_some()));
}

/// Orders of a multi-address answer kept encoded (more addresses still rotate,
/// through these few starting points).
pub const MAX_TURNS: usize = 4;

/// A stored answer: everything after the question, with the key it answers.
#[derive(Debug)]
pub struct Stored {
    scope: CacheScope,
    /// Answer flags without the request's RD/CD bits.
    flags: u16,
    /// Answer, authority and additional counts.
    counts: [u8; 6],
    /// The key (once stored, see [`WireCache::put`]) and then everything after the
    /// question, once per turn (see [`Stored::add_turn`]), in one allocation: a hit
    /// reads one block of memory, not one per part.
    bytes: Vec<u8>,
    key_len: usize,
    /// Where each turn's tail ends in `bytes` (after the key).
    ends: [usize; MAX_TURNS],
    turns: usize,
    /// The key's hash in its [`WireCache`].
    hash: u64,
    next: std::sync::atomic::AtomicUsize,
}

impl Stored {
    /// Cuts a freshly encoded answer to `q` into what can be reused.
    pub fn from_answer(answer: &[u8], question_len: usize, scope: CacheScope) -> Option<Self> {
        if scope == CacheScope::No || answer.len() < 12 + question_len {
            return None;
        }
        let flags = u16::from_be_bytes([answer[2], answer[3]]) & !(RD | CD);
        let mut counts = [0u8; 6];
        counts.copy_from_slice(&answer[6..12]);
        let tail = &answer[12 + question_len..];
        let mut ends = [0; MAX_TURNS];
        ends[0] = tail.len();
        Some(Self {
            scope,
            flags,
            counts,
            bytes: tail.to_vec(),
            key_len: 0,
            ends,
            turns: 1,
            hash: 0,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Adds the same answer with its addresses in another order; served in turns.
    /// An encoding with other counts is not the same answer and is left out, as is
    /// any turn past [`MAX_TURNS`].
    pub fn add_turn(&mut self, answer: &[u8], question_len: usize) {
        if self.turns < MAX_TURNS
            && answer.len() >= 12 + question_len
            && answer[6..12] == self.counts
        {
            self.bytes.extend_from_slice(&answer[12 + question_len..]);
            self.ends[self.turns] = self.bytes.len() - self.key_len;
            self.turns += 1;
        }
    }

    /// Whether it may answer now, in zone `generation`, for a client that may or may
    /// not use the forwarder.
    pub fn usable(&self, generation: u64, may_forward: impl FnOnce() -> bool) -> bool {
        match self.scope {
            CacheScope::Zone(g) => g == generation,
            CacheScope::Forwarded(until) => Instant::now() < until && may_forward(),
            CacheScope::No => false,
        }
    }

    /// Whether it is an answer from the cluster zone (else from the forwarder).
    pub fn from_zone(&self) -> bool {
        matches!(self.scope, CacheScope::Zone(_))
    }

    /// Writes the answer to a request with id `id` and question `q` into `out`.
    pub fn write(&self, request: &[u8], q: &Question<'_>, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&request[0..2]);
        out.extend_from_slice(&(self.flags | (q.flags & (RD | CD))).to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&self.counts);
        out.extend_from_slice(q.raw);
        let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.turns;
        let start = if turn == 0 { 0 } else { self.ends[turn - 1] };
        let tails = &self.bytes[self.key_len..];
        out.extend_from_slice(&tails[start..self.ends[turn]]);
    }

    fn key(&self) -> &[u8] {
        &self.bytes[..self.key_len]
    }

    /// Puts `key` in front of the tails.
    fn set_key(&mut self, key: &[u8], hash: u64) {
        self.bytes.splice(..self.key_len, key.iter().copied());
        self.key_len = key.len();
        self.hash = hash;
    }
}

/// Shards of the store: a miss write-locks one shard, not the whole cache.
const SHARDS: usize = 16;

type Shard = RwLock<HashTable<Arc<Stored>>>;

/// The shared store, bounded: a full shard starts over (answers are cheap to redo),
/// so no single miss ever clears more than 1/16 of it. Entries are found by the
/// key's hash (foldhash, seeded per process) and compared with the key kept in
/// front of the answer, so a lookup reads the table and one allocation.
pub struct WireCache {
    shards: Vec<Shard>,
    max_per_shard: usize,
    hasher: foldhash::fast::RandomState,
}

impl WireCache {
    /// A store of about `max_entries` answers.
    pub fn new(max_entries: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashTable::new())).collect(),
            max_per_shard: (max_entries / SHARDS).max(1),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn locate(&self, key: &[u8]) -> (u64, &Shard) {
        let hash = self.hasher.hash_one(key);
        // The table uses the low bits; the shard comes from the high ones.
        (hash, &self.shards[(hash >> 60) as usize % SHARDS])
    }

    /// The stored answer for `key`.
    pub fn get(&self, key: &[u8]) -> Option<Arc<Stored>> {
        let (hash, shard) = self.locate(key);
        let entries = shard.read().ok()?;
        entries.find(hash, |s| s.key() == key).cloned()
    }

    /// Keeps `stored` for `key`.
    pub fn put(&self, key: Vec<u8>, mut stored: Stored) {
        let (hash, shard) = self.locate(&key);
        stored.set_key(&key, hash);
        let Ok(mut entries) = shard.write() else {
            return;
        };
        if let Ok(entry) = entries.find_entry(hash, |s| s.key() == key) {
            entry.remove();
        } else if entries.len() >= self.max_per_shard {
            entries.clear();
        }
        entries.insert_unique(hash, Arc::new(stored), |s| s.hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `WeB.x` A, id 0x1234, RD, with an EDNS OPT (payload 1232).
    fn query() -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        p.extend_from_slice(&[3, b'W', b'e', b'B', 1, b'x', 0, 0, 1, 0, 1]);
        p.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        p
    }

    #[test]
    fn parses_plain_queries_only() {
        let p = query();
        let q = question(&p).unwrap();
        assert_eq!(q.raw, &p[12..23]);
        assert_eq!(q.edns_payload, Some(1232));
        assert_eq!(q.flags, 0x0100);
        let mut response = p.clone();
        response[2] |= 0x80;
        assert!(question(&response).is_none(), "a response is not a query");
        let mut two = p.clone();
        two[5] = 2;
        assert!(question(&two).is_none());
        assert!(question(&p[..15]).is_none());
        // A cookie option is fine; options that do not add up are not.
        let mut cookie = p.clone();
        cookie[32..34].copy_from_slice(&12u16.to_be_bytes());
        cookie.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(question(&cookie).is_some());
        let mut bad = cookie.clone();
        bad[37] = 9; // the option claims more bytes than there are
        assert!(question(&bad).is_none());
        let mut v1 = p.clone();
        v1[29] = 1; // EDNS version 1
        assert!(question(&v1).is_none());
    }

    #[test]
    fn keys_ignore_case_and_reuse_echoes_the_request() {
        let p = query();
        let q = question(&p).unwrap();
        let (mut k1, mut k2) = (Vec::new(), Vec::new());
        key(&q, 1232, &mut k1);
        let mut upper = p.clone();
        upper[13] = b'w';
        key(&question(&upper).unwrap(), 1232, &mut k2);
        assert_eq!(k1, k2);
        // Types 65 (HTTPS) and 97 differ only in the bit case folding flips.
        let of_type = |qtype: u8| {
            let mut p = query();
            p[20] = qtype;
            let mut k = Vec::new();
            key(&question(&p).unwrap(), 1232, &mut k);
            k
        };
        assert_ne!(of_type(65), of_type(97));

        // An encoded answer: header (aa, rd), the question, one answer (pointer to 12).
        let mut answer = vec![0x12, 0x34, 0x85, 0x00, 0, 1, 0, 1, 0, 0, 0, 0];
        answer.extend_from_slice(q.raw);
        let tail = [0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 96, 0, 10];
        answer.extend_from_slice(&tail);
        let stored = Stored::from_answer(&answer, q.raw.len(), CacheScope::Zone(7)).unwrap();
        assert!(stored.usable(7, || false) && !stored.usable(8, || false));
        let mut out = Vec::new();
        let mut second = upper.clone();
        second[0] = 0xab;
        second[2] = 0x00; // no RD this time
        let q2 = question(&second).unwrap();
        stored.write(&second, &q2, &mut out);
        assert_eq!(&out[0..2], &[0xab, 0x34]);
        assert_eq!(u16::from_be_bytes([out[2], out[3]]) & RD, 0);
        assert_eq!(&out[12..23], q2.raw, "the client's own spelling");
        assert_eq!(&out[23..], &tail);
        assert!(Stored::from_answer(&answer, q.raw.len(), CacheScope::No).is_none());

        // The same answer with another address: served in turns.
        let mut stored = Stored::from_answer(&answer, q.raw.len(), CacheScope::Zone(7)).unwrap();
        let mut other = answer.clone();
        let last = other.len() - 1;
        other[last] = 11;
        stored.add_turn(&other, q.raw.len());
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            stored.write(&second, &q2, &mut out);
            seen.insert(out[out.len() - 1]);
        }
        assert_eq!(seen, [10, 11].into(), "both orders are served");
    }

    #[test]
    fn the_store_finds_answers_by_key_and_replaces_them() {
        let p = query();
        let q = question(&p).unwrap();
        let mut answer = vec![0x12, 0x34, 0x85, 0x00, 0, 1, 0, 1, 0, 0, 0, 0];
        answer.extend_from_slice(q.raw);
        answer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 96, 0, 10]);
        let cache = WireCache::new(32);
        let stored = |last: u8| {
            let mut a = answer.clone();
            *a.last_mut().unwrap() = last;
            Stored::from_answer(&a, q.raw.len(), CacheScope::Zone(1)).unwrap()
        };
        let (mut k1, mut k2) = (Vec::new(), Vec::new());
        key(&q, 1232, &mut k1);
        key(&q, 512, &mut k2);
        cache.put(k1.clone(), stored(10));
        assert!(
            cache.get(&k2).is_none(),
            "another buffer size is another key"
        );
        let mut out = Vec::new();
        cache.get(&k1).unwrap().write(&p, &q, &mut out);
        assert_eq!(out.last(), Some(&10));
        cache.put(k1.clone(), stored(11));
        cache.get(&k1).unwrap().write(&p, &q, &mut out);
        assert_eq!(out.last(), Some(&11), "replaced, not added beside");
        for i in 0..100u16 {
            cache.put(i.to_be_bytes().to_vec(), stored(12));
        }
        let kept = cache
            .shards
            .iter()
            .map(|s| s.read().unwrap().len())
            .sum::<usize>();
        assert!(kept <= 32 + SHARDS, "bounded: {kept}");
    }
}
