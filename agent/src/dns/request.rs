//! A DNS request off the wire, for both transports: the header checked before the
//! message is parsed (the parser reserves room for as many records as the counts
//! claim, so a 12-byte packet claiming 65535 questions must never reach it), the
//! refusals (FORMERR, NOTIMP, BADVERS) encoded, and answers encoded.

use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
    emit_message_parts,
};
use hickory_server::proto::serialize::binary::{
    BinDecodable as _, BinDecoder, BinEncodable as _, BinEncoder,
};
use tracing::{debug, warn};

use super::{Records, response_edns, unsupported_edns_version};

/// Additional records a query may carry (an OPT, a cookie's, a TSIG...).
const MAX_ADDITIONALS: u16 = 4;

/// What a packet turned out to be.
#[derive(Debug)]
pub enum Parsed {
    /// A query to answer, with the EDNS to answer with.
    Query {
        message: Message,
        edns: Option<Edns>,
    },
    /// A request refused with an error code: the reply is in the output buffer.
    Refused,
    /// Not a request at all (too short, a response): dropped.
    Ignored,
}

/// Checks and decodes `packet`; refusals are encoded into `out`.
pub fn parse(packet: &[u8], out: &mut Vec<u8>) -> Parsed {
    let Ok(header) = Header::read(&mut BinDecoder::new(packet)) else {
        return Parsed::Ignored;
    };
    if header.metadata.message_type != MessageType::Query {
        return Parsed::Ignored;
    }
    let c = &header.counts;
    if c.queries != 1 || c.answers != 0 || c.authorities != 0 || c.additionals > MAX_ADDITIONALS {
        return refuse(&header.metadata, ResponseCode::FormErr, out);
    }
    let message = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(e) => {
            debug!(error = %e, "malformed DNS query");
            return refuse(&header.metadata, ResponseCode::FormErr, out);
        }
    };
    if message.metadata.op_code != OpCode::Query {
        return refuse(&header.metadata, ResponseCode::NotImp, out);
    }
    if message.queries.len() != 1 {
        return refuse(&header.metadata, ResponseCode::FormErr, out);
    }
    let edns = response_edns(message.edns.as_ref());
    if unsupported_edns_version(message.edns.as_ref()) {
        let badvers = Records::error(ResponseCode::BADVERS);
        return if encode(
            &message.metadata,
            &message.queries[0],
            edns.as_ref(),
            &badvers,
            u16::MAX,
            out,
        ) {
            Parsed::Refused
        } else {
            Parsed::Ignored
        };
    }
    Parsed::Query { message, edns }
}

/// A header-only answer with `code`.
fn refuse(request: &Metadata, code: ResponseCode, out: &mut Vec<u8>) -> Parsed {
    let mut metadata = Metadata::response_from_request(request);
    metadata.response_code = code;
    let header = Header {
        metadata,
        counts: HeaderCounts::default(),
    };
    out.clear();
    let mut encoder = BinEncoder::new(out);
    match header.emit(&mut encoder) {
        Ok(()) => Parsed::Refused,
        Err(_) => Parsed::Ignored,
    }
}

/// Encodes an answer into `out`, truncated (TC) beyond `max_size`; `false` if it
/// could not be encoded.
pub fn encode(
    request: &Metadata,
    query: &Query,
    edns: Option<&Edns>,
    records: &Records,
    max_size: u16,
    out: &mut Vec<u8>,
) -> bool {
    let mut metadata = Metadata::response_from_request(request);
    metadata.recursion_available = true;
    metadata.authoritative = records.authoritative;
    metadata.response_code = records.rcode;
    out.clear();
    let mut encoder = BinEncoder::new(out);
    encoder.set_max_size(max_size);
    let encoded = emit_message_parts(
        &metadata,
        &mut std::iter::once(query),
        &mut records.answers.iter(),
        &mut records.authorities.iter(),
        &mut records.additionals.iter(),
        edns,
        None,
        &mut encoder,
    );
    match encoded {
        Ok(_) => true,
        Err(e) => {
            warn!(error = %e, "cannot encode DNS answer");
            false
        }
    }
}
