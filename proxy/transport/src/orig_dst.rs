//! The original destination of a connection that iptables redirected to this proxy.
//!
//! A `REDIRECT` (or `DNAT`) rule in the `nat` table rewrites the destination of a connection's
//! first packet; conntrack remembers the original, and the kernel hands it back through the
//! `SO_ORIGINAL_DST` socket option (`IP6T_SO_ORIGINAL_DST` for IPv6). A connection that was
//! not redirected has no such entry: the call fails with `ENOENT`.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

/// Where `stream` was going before it was redirected to this listener.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    let socket = SockRef::from(stream);
    let addr = if local.is_ipv4() {
        socket.original_dst_v4()?
    } else {
        socket.original_dst_v6()?
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST returned an address that is not IP",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a redirect there is no original destination: the lookup fails rather than
    /// answering with the listener's own address (which would loop the connection back).
    #[tokio::test]
    async fn a_connection_that_was_not_redirected_has_none() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let _client = client.unwrap();
        let (server, _) = accepted.unwrap();
        assert!(original_dst(&server).is_err());
    }
}
