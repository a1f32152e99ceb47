//! Load shedding: a bound on concurrent data requests and on the memory they hold.
//!
//! Every `FeatureService` call is admitted before it does any work, or refused at once with
//! `RESOURCE_EXHAUSTED` and retry advice (a `google.rpc.RetryInfo` in the status details), so
//! overload never queues without bound:
//! - at most `max_requests` calls run at once (streams count until they end);
//! - the bytes they hold are charged against one budget (quiverd: its memory budget /
//!   [`REQUEST_MEMORY_SHARE_DIVISOR`]). A call reserves what it knows before work starts (its
//!   decoded request, the fixed part of its answer, a join's in-memory answer buffer) and
//!   charges more as its answer grows (an online lookup's values, as the engine reads them);
//!   a charge that does not fit stops the call with `RESOURCE_EXHAUSTED`, and everything it
//!   reserved is returned when it ends.
//!
//! A unary answer is still in memory while it is encoded and sent: the handler attaches its
//! ticket to the response ([`HeldTicket`]) and [`HoldTickets`] keeps it until the response body
//! has been sent (or dropped), so a slow reader holds its share of the budget, not more.
//!
//! A request's own bytes are charged to the same budget while they arrive, before tonic
//! buffers and decodes them ([`AdmitRequests`]): each gRPC message's length prefix is read as
//! it comes in, so a message over its service's size limit, or over the whole budget, is
//! refused with `RESOURCE_EXHAUSTED` before a byte of it is buffered; its bytes are charged as
//! they arrive (a stalled sender holds only what it sent) and returned once it is complete,
//! when tonic decodes it and the handler charges what it holds; a message that does not fit
//! now is shed with retry advice. (Replication messages may be zstd-compressed: there the
//! prefix is the compressed length, and tonic bounds the decompressed one.)
//!
//! One online answer is also bounded on its own (by [`ONLINE_ANSWER_BYTES_MAX`] and a quarter
//! of the requests' memory, [`ONLINE_ANSWER_SHARE_DIVISOR`]): past it the request is refused
//! whatever the load, as too large to serve online, without retry advice.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::Status;

/// quiverd lets requests in flight hold its memory budget divided by this.
pub const REQUEST_MEMORY_SHARE_DIVISOR: usize = 8;
/// Data requests running at once, unless configured otherwise.
pub const REQUESTS_IN_FLIGHT_MAX_DEFAULT: usize = 256;
/// Largest `--max-concurrent-requests`.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 100_000;
/// Most memory one online answer may hold (its values read, then its columns).
pub const ONLINE_ANSWER_BYTES_MAX: usize = 64 << 20;
/// One online answer may also hold at most the requests' memory divided by this.
pub const ONLINE_ANSWER_SHARE_DIVISOR: usize = 4;
/// The retry advice sent with a shed request.
pub const RETRY_AFTER: Duration = Duration::from_millis(100);

/// The admission state of one server.
#[derive(Debug)]
pub struct Admission {
    requests_max: usize,
    requests: AtomicUsize,
    bytes_max: usize,
    bytes: AtomicUsize,
    shed: AtomicU64,
}

/// An admitted call: holds its request slot and its reserved bytes until dropped.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    bytes: usize,
}

/// `RESOURCE_EXHAUSTED` with retry advice.
pub fn shed_status(message: String) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(RETRY_AFTER)),
    )
}

impl Admission {
    /// At most `requests_max` calls at once holding at most `bytes_max` bytes.
    pub fn new(requests_max: usize, bytes_max: usize) -> Arc<Admission> {
        Arc::new(Admission {
            requests_max,
            requests: AtomicUsize::new(0),
            bytes_max,
            bytes: AtomicUsize::new(0),
            shed: AtomicU64::new(0),
        })
    }

    /// Admits a call reserving `bytes`, or sheds it.
    pub fn admit(self: &Arc<Self>, bytes: usize) -> Result<Ticket, Status> {
        let n = self.requests.fetch_add(1, Ordering::AcqRel);
        if n >= self.requests_max {
            self.requests.fetch_sub(1, Ordering::AcqRel);
            self.shed.fetch_add(1, Ordering::Relaxed);
            return Err(shed_status(format!(
                "overloaded: {} requests in flight (the most is {}); retry shortly",
                n, self.requests_max
            )));
        }
        let mut ticket = Ticket { admission: self.clone(), bytes: 0 };
        if bytes > self.bytes_max {
            // It would never fit: no retry advice, so a client splits it instead of retrying.
            return Err(Status::resource_exhausted(format!(
                "this request needs {bytes} bytes, more than all requests in flight may hold ({}; quiverd \
                 --memory-budget-mb sets it): send it in smaller parts",
                self.bytes_max
            )));
        }
        if !ticket.charge(bytes) {
            return Err(shed_status(format!(
                "overloaded: this request needs {bytes} bytes and requests in flight hold {} of {}; retry shortly",
                self.bytes.load(Ordering::Relaxed),
                self.bytes_max
            )));
        }
        Ok(ticket)
    }

    /// The most bytes calls in flight may hold.
    pub fn bytes_max(&self) -> usize {
        self.bytes_max
    }

    /// Bytes reserved by calls in flight.
    pub fn bytes_in_flight(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Calls in flight.
    pub fn requests_in_flight(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// Calls shed since start.
    pub fn shed_total(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }
}

impl Admission {
    /// Adds `more` to the bytes held if they fit; counts a shed request otherwise.
    fn try_hold(&self, more: usize) -> bool {
        let fits = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(more).filter(|&total| total <= self.bytes_max)
            })
            .is_ok();
        if !fits {
            self.shed.fetch_add(1, Ordering::Relaxed);
        }
        fits
    }
}

impl Ticket {
    /// Returns `bytes` of what this call reserved (a stream between messages).
    pub fn refund(&mut self, bytes: usize) {
        let bytes = bytes.min(self.bytes);
        self.admission.bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.bytes -= bytes;
    }

    /// Reserves `more` bytes for this call; false (and nothing reserved) if they do not fit.
    pub fn charge(&mut self, more: usize) -> bool {
        let fits = self.admission.try_hold(more);
        if fits {
            self.bytes += more;
        }
        fits
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.admission.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A ticket attached to a response (`Response::extensions_mut().insert(...)`), released when
/// the response body is done.
#[derive(Debug, Clone)]
pub struct HeldTicket(pub Arc<Ticket>);

/// Wraps a gRPC service so that a [`HeldTicket`] in a response's extensions lives as long as
/// the response body, and big data frames go out in slices (see [`RESPONSE_SLICE_BYTES`]).
#[derive(Debug, Clone)]
pub struct HoldTickets<S>(pub S);

impl<S: NamedService> NamedService for HoldTickets<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, RB> Service<http::Request<B>> for HoldTickets<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(async move {
            let (mut parts, body) = fut.await?.into_parts();
            let ticket = parts.extensions.remove::<HeldTicket>();
            let body = TicketBody { body: Box::pin(body), rest: Bytes::new(), _ticket: ticket };
            Ok(http::Response::from_parts(parts, tonic::body::Body::new(body)))
        })
    }
}

/// Largest data frame a response body hands to HTTP/2 at once. The server's HTTP/2 layer
/// waits for send capacity between frames but buffers a whole frame, so a big answer goes out
/// in slices: what waits for a slow reader stays here, charged to its ticket, instead of
/// piling up uncharged in the connection's send buffer.
pub const RESPONSE_SLICE_BYTES: usize = 64 << 10;

/// A response body that holds its call's ticket and hands out its data in slices of at most
/// [`RESPONSE_SLICE_BYTES`].
struct TicketBody<B> {
    body: std::pin::Pin<Box<B>>,
    rest: Bytes,
    _ticket: Option<HeldTicket>,
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for TicketBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        use std::task::Poll;
        if self.rest.is_empty() {
            match self.body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => self.rest = data,
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                other => return other,
            }
        }
        let n = self.rest.len().min(RESPONSE_SLICE_BYTES);
        Poll::Ready(Some(Ok(http_body::Frame::data(self.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let inner = self.body.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

/// Wraps a gRPC service so that each request message is reserved against the budget as its
/// length prefix arrives (see the module doc), and refused over `message_max`.
#[derive(Debug, Clone)]
pub struct AdmitRequests<S> {
    inner: S,
    admission: Arc<Admission>,
    message_max: usize,
}

impl<S> AdmitRequests<S> {
    /// `inner`, taking messages of at most `message_max` bytes while they fit in `admission`.
    pub fn new(inner: S, admission: Arc<Admission>, message_max: usize) -> Self {
        AdmitRequests { inner, admission, message_max }
    }
}

impl<S: NamedService> NamedService for AdmitRequests<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for AdmitRequests<S>
where
    S: Service<http::Request<tonic::body::Body>>,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> S::Future {
        let (parts, body) = req.into_parts();
        let body = MeteredBody {
            body,
            framing: Framing::default(),
            held: 0,
            admission: self.admission.clone(),
            message_max: self.message_max,
            failed: false,
        };
        self.inner.call(http::Request::from_parts(parts, tonic::body::Body::new(body)))
    }
}

/// Where a request body stands in gRPC's framing: `flag u8 | length u32 (big-endian) | message`.
#[derive(Debug, Default)]
struct Framing {
    header: [u8; 5],
    header_len: usize,
    message_left: u64,
}

/// What [`Framing::observe`] sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// A message's length prefix: the message is this long.
    Begin(usize),
    /// This many bytes of the current message arrived.
    Bytes(usize),
    /// The current message is complete.
    End,
}

impl Framing {
    /// Walks `data`, reporting each message's length prefix, its bytes and its end.
    fn observe(&mut self, mut data: &[u8], mut on: impl FnMut(Seen) -> Result<(), Status>) -> Result<(), Status> {
        while !data.is_empty() {
            if self.message_left > 0 {
                let n = self.message_left.min(data.len() as u64);
                self.message_left -= n;
                data = &data[n as usize..];
                on(Seen::Bytes(n as usize))?;
                if self.message_left == 0 {
                    on(Seen::End)?;
                }
                continue;
            }
            let take = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            data = &data[take..];
            if self.header_len == 5 {
                self.header_len = 0;
                let len = u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                on(Seen::Begin(len as usize))?;
                self.message_left = u64::from(len);
                if len == 0 {
                    on(Seen::End)?;
                }
            }
        }
        Ok(())
    }
}

/// A request body whose arriving message is charged to the budget as its bytes come in
/// (returned when the message is complete: tonic decodes it then, and the handler charges
/// what it holds), and refused at its length prefix when it could never fit.
/// (The incoming body is `Unpin`, as hyper's and tonic's are: it is polled in place, with no
/// allocation per request.)
struct MeteredBody<B> {
    body: B,
    framing: Framing,
    held: usize,
    admission: Arc<Admission>,
    message_max: usize,
    failed: bool,
}

impl<B> MeteredBody<B> {
    fn release(&mut self) {
        self.admission.bytes.fetch_sub(self.held, Ordering::AcqRel);
        self.held = 0;
    }

    fn seen(&mut self, event: Seen) -> Result<(), Status> {
        match event {
            Seen::Begin(len) => {
                self.release();
                if len > self.message_max {
                    return Err(Status::resource_exhausted(format!(
                        "request message is {len} bytes, over this service's limit of {} bytes",
                        self.message_max
                    )));
                }
                if len > self.admission.bytes_max {
                    return Err(Status::resource_exhausted(format!(
                        "request message is {len} bytes, more than this server's memory for requests ({} bytes)",
                        self.admission.bytes_max
                    )));
                }
                Ok(())
            }
            Seen::Bytes(n) => {
                if !self.admission.try_hold(n) {
                    return Err(shed_status(format!(
                        "overloaded: requests in flight hold {} of {} bytes; retry shortly",
                        self.admission.bytes.load(Ordering::Relaxed),
                        self.admission.bytes_max
                    )));
                }
                self.held += n;
                Ok(())
            }
            Seen::End => {
                self.release();
                Ok(())
            }
        }
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        self.release();
    }
}

impl<B> http_body::Body for MeteredBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        use std::task::Poll;
        if self.failed {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let mut framing = std::mem::take(&mut this.framing);
                    let seen = framing.observe(data, |event| this.seen(event));
                    this.framing = framing;
                    if let Err(status) = seen {
                        this.failed = true;
                        this.release();
                        return Poll::Ready(Some(Err(status)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Status::from_error(e.into())))),
            Poll::Ready(None) => {
                this.release();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_bytes_are_bounded_and_returned() {
        let a = Admission::new(2, 1000);
        let t1 = a.admit(600).expect("first");
        let shed = a.admit(600).expect_err("bytes do not fit");
        assert_eq!(shed.code(), tonic::Code::ResourceExhausted);
        use tonic_types::StatusExt;
        assert_eq!(shed.get_details_retry_info().and_then(|r| r.retry_delay), Some(RETRY_AFTER));
        let mut t2 = a.admit(100).expect("second");
        assert_eq!(a.admit(0).map(|_| ()).map_err(|s| s.code()), Err(tonic::Code::ResourceExhausted), "two calls");
        assert!(t2.charge(300) && !t2.charge(1), "charges stop at the budget");
        t2.refund(300);
        assert_eq!(a.bytes_in_flight(), 700, "a refund returns bytes, not the call's slot");
        assert!(t2.charge(300));
        assert_eq!((a.bytes_in_flight(), a.requests_in_flight()), (1000, 2));
        drop(t1);
        drop(t2);
        assert_eq!((a.bytes_in_flight(), a.requests_in_flight()), (0, 0));
        assert_eq!(a.shed_total(), 3);
    }

    fn framed(messages: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            out.push(0);
            out.extend_from_slice(&(m.len() as u32).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    #[test]
    fn a_call_larger_than_all_request_memory_is_refused_without_retry_advice() {
        use tonic_types::StatusExt;
        let a = Admission::new(4, 1000);
        let never = a.admit(1001).expect_err("it can never fit");
        assert_eq!(never.code(), tonic::Code::ResourceExhausted);
        assert!(never.get_details_retry_info().is_none(), "retrying cannot help: {never:?}");
        assert!(never.message().contains("smaller parts"), "{}", never.message());
        assert_eq!(a.bytes_in_flight(), 0);
        // One that fits the total but not now keeps its retry advice.
        let _held = a.admit(600).expect("fits");
        let busy = a.admit(1000).expect_err("busy");
        assert!(busy.get_details_retry_info().is_some());
        drop(_held);
        assert!(a.admit(1000).is_ok(), "the whole budget when nothing else holds it");
    }

    #[test]
    fn framing_finds_every_message_across_any_split() {
        let wire = framed(&[&[1; 7], &[], &[2; 300], &[3; 1]]);
        for chunk in 1..=wire.len() {
            let mut f = Framing::default();
            let (mut begins, mut bytes, mut ends) = (Vec::new(), Vec::new(), 0);
            for piece in wire.chunks(chunk) {
                f.observe(piece, |event| {
                    match event {
                        Seen::Begin(len) => {
                            begins.push(len);
                            bytes.push(0);
                        }
                        Seen::Bytes(n) => *bytes.last_mut().expect("inside a message") += n,
                        Seen::End => ends += 1,
                    }
                    Ok(())
                })
                .expect("observes");
            }
            assert_eq!(begins, [7, 0, 300, 1], "chunks of {chunk}");
            assert_eq!(bytes, begins, "every byte of every message, chunks of {chunk}");
            assert_eq!(ends, 4, "chunks of {chunk}");
        }
    }

    #[tokio::test]
    async fn a_request_body_holds_what_arrived_of_its_message_and_is_refused_over_the_limits() {
        use http_body_util::BodyExt;
        type Pieces = http_body_util::StreamBody<
            tokio_stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::convert::Infallible>>>,
        >;
        let a = Admission::new(10, 1000);
        let body = |bytes: Vec<u8>, cut: usize, max| {
            let (head, tail) = bytes.split_at(cut.min(bytes.len()));
            let frames = vec![
                Ok(http_body::Frame::data(Bytes::copy_from_slice(head))),
                Ok(http_body::Frame::data(Bytes::copy_from_slice(tail))),
            ];
            MeteredBody::<Pieces> {
                body: http_body_util::StreamBody::new(tokio_stream::iter(frames)),
                framing: Framing::default(),
                held: 0,
                admission: a.clone(),
                message_max: max,
                failed: false,
            }
        };
        // What arrived of a message is held until it is complete.
        let mut b = body(framed(&[&[9; 600]]), 5 + 250, 800);
        assert!(b.frame().await.expect("a frame").expect("data").is_data());
        assert_eq!(a.bytes_in_flight(), 250);
        assert!(b.frame().await.expect("a frame").expect("data").is_data());
        assert_eq!(a.bytes_in_flight(), 0, "returned once the message is complete");
        assert!(b.frame().await.is_none());
        // Over the service's limit or over the budget: refused at the length prefix.
        let over = body(framed(&[&[9; 900]]), 5, 800).collect().await.expect_err("over the limit");
        assert_eq!(over.code(), tonic::Code::ResourceExhausted);
        assert!(over.message().contains("limit of 800"), "{}", over.message());
        let huge = body(framed(&[&[9; 1200]]), 5, 5000).collect().await.expect_err("over the budget");
        assert!(huge.message().contains("memory for requests"), "{}", huge.message());
        // Bytes that do not fit now: shed with retry advice.
        let mut holder = body(framed(&[&[9; 800]]), 5 + 700, 5000);
        let _ = holder.frame().await;
        assert_eq!(a.bytes_in_flight(), 700);
        let shed = body(framed(&[&[9; 400]]), 5 + 400, 5000).collect().await.expect_err("does not fit now");
        use tonic_types::StatusExt;
        assert_eq!(shed.get_details_retry_info().and_then(|r| r.retry_delay), Some(RETRY_AFTER));
        drop(holder);
        assert_eq!(a.bytes_in_flight(), 0, "a dropped body returns what it held");
    }
}
