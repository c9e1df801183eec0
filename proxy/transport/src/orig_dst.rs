//! The original destination of a connection that iptables redirected to this proxy.
//!
//! A `REDIRECT` (or `DNAT`) rule in the `nat` table rewrites the destination of a connection's
//! first packet; conntrack remembers the original, and the kernel hands it back through the
//! `SO_ORIGINAL_DST` socket option (`IP6T_SO_ORIGINAL_DST` for IPv6). A connection that was
//! not redirected has no such entry: the call fails with `ENOENT`.
//!
//! `ip6tables` redirects IPv6 connections to the same port on `::1` (outbound) or the
//! receiving interface's IPv6 address (inbound), so a transparent listener bound to an IPv4
//! address has an IPv6 sibling on the same port ([`bind_ipv6_sibling`]).

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// Where `stream` was going before it was redirected to this listener.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    let socket = SockRef::from(stream);
    // An IPv4 connection accepted on a dual-stack IPv6 socket (local `::ffff:a.b.c.d`) was
    // tracked, and redirected, as IPv4.
    let addr = if local.ip().to_canonical().is_ipv4() {
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

/// The IPv6 counterpart of an IPv4 listener address: `::1` for `127.0.0.1`, `::` for
/// `0.0.0.0`; `None` for any other address (which names one interface's address).
pub fn ipv6_sibling(addr: SocketAddr) -> Option<SocketAddr> {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => Some((Ipv6Addr::LOCALHOST, addr.port()).into()),
        IpAddr::V4(ip) if ip.is_unspecified() => Some((Ipv6Addr::UNSPECIFIED, addr.port()).into()),
        _ => None,
    }
}

/// Binds `addr` (an IPv6 address) for IPv6 only, so it can share its port with an IPv4
/// listener on the IPv4 wildcard.
pub fn bind_ipv6_only(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
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

    #[tokio::test]
    async fn an_ipv6_sibling_shares_the_ipv4_wildcard_port() {
        assert_eq!(ipv6_sibling("10.0.0.1:4143".parse().unwrap()), None);
        let v4 = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let sibling = ipv6_sibling(v4.local_addr().unwrap()).unwrap();
        assert_eq!(sibling.to_string(), format!("[::]:{}", sibling.port()));
        // A host without IPv6 cannot have the sibling; the addresses are all it can check.
        if std::path::Path::new("/proc/net/if_inet6").exists() {
            let v6 = bind_ipv6_only(sibling).unwrap();
            assert_eq!(v6.local_addr().unwrap(), sibling);
        }
    }
}
