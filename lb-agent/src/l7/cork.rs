//! Corking a client connection before the last bytes of the answer that closes it.
//!
//! Without it, the answer leaves as soon as it is written (`TCP_NODELAY`), and the FIN
//! follows in a segment of its own when the socket is shut down a moment later: two
//! segments for the client's kernel to take in, and two acknowledgements back. Corked,
//! the last partial segment waits in the socket until the shutdown, which attaches the
//! FIN to it and sends both at once. Over `veth` the receiver's work runs on the
//! sender's CPU, so the segment saved is the hop's CPU too.
//!
//! The cork is set only once the answer's body has ended, just before its last write,
//! so a streamed answer is never held back; the kernel would release it after 200 ms
//! anyway.

/// A client connection that can hold its last partial segment until it ends.
pub trait Cork {
    /// Corks the connection: what is written from now on is held (as with `TCP_CORK`
    /// or `MSG_MORE`) until the write side's shutdown, which sends it with the FIN. A
    /// connection that cannot be corked sends the FIN on its own, as without.
    fn cork(&mut self);
}

/// TLS: the answer's last record and the close_notify that follows it leave with the
/// FIN.
impl<S: Cork> Cork for tokio_rustls::server::TlsStream<S> {
    fn cork(&mut self) {
        self.get_mut().0.cork();
    }
}
