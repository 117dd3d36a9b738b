//! DNS over TCP, through hickory-server: framing, timeouts and truncation-free
//! answers; the answers themselves come from the shared [`Answerer`].

use std::sync::Arc;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tracing::warn;

use super::metrics::{Answered, DnsMetrics, Plugin};
use super::{Answerer, Reply, response_edns, unsupported_edns_version};

/// hickory-server's view of the [`Answerer`].
pub struct TcpHandler {
    answerer: Arc<Answerer>,
    metrics: Arc<DnsMetrics>,
    listen: std::net::SocketAddr,
}

impl TcpHandler {
    /// Answers for the listener on `listen`, counted in `metrics`.
    pub fn new(
        answerer: Arc<Answerer>,
        metrics: Arc<DnsMetrics>,
        listen: std::net::SocketAddr,
    ) -> Self {
        Self {
            answerer,
            metrics,
            listen,
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for TcpHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let edns = response_edns(request.edns.as_ref());
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        let query = match request.request_info() {
            Ok(_) if unsupported_edns_version(request.edns.as_ref()) => {
                metadata.response_code = ResponseCode::BADVERS;
                return send(&mut response, builder.build_no_records(metadata), request).await;
            }
            Ok(info)
                if request.metadata.message_type == MessageType::Query
                    && request.metadata.op_code == OpCode::Query =>
            {
                info.query.original().clone()
            }
            Ok(_) => {
                metadata.response_code = ResponseCode::NotImp;
                return send(&mut response, builder.build_no_records(metadata), request).await;
            }
            Err(_) => {
                metadata.response_code = ResponseCode::FormErr;
                return send(&mut response, builder.build_no_records(metadata), request).await;
            }
        };
        let started = std::time::Instant::now();
        let (records, plugin) = match self.answerer.answer(&query, request.src().ip()) {
            Reply::Now(records) => {
                let plugin = super::plugin_of(&records);
                (records, plugin)
            }
            Reply::Forward => (self.answerer.forward(&query).await, Plugin::Forward),
        };
        self.metrics.recorder(self.listen, "tcp").record(&Answered {
            client: request.src(),
            id: request.metadata.id,
            name: query.name(),
            qtype: u16::from(query.query_type()),
            rcode: u16::from(records.rcode),
            plugin,
            size: 0,
            started,
        });
        metadata.response_code = records.rcode;
        metadata.authoritative = records.authoritative;
        let r = builder.build(
            metadata,
            records.answers.iter(),
            records.authorities.iter(),
            None::<&hickory_server::proto::rr::Record>,
            records.additionals.iter(),
        );
        send(&mut response, r, request).await
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    message: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a hickory_server::proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_server::proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_server::proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_server::proto::rr::Record> + Send + 'a,
    >,
    request: &Request,
) -> ResponseInfo {
    match response.send_response(message).await {
        Ok(info) => info,
        Err(e) => {
            warn!(error = %e, src = %request.src(), "cannot send DNS response");
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        }
    }
}
