//! PROXY protocol version 2, as a Network Load Balancer sends it.
//!
//! Behind an NLB (the VPC endpoint service path KMS uses), every connection
//! comes from the load balancer's address. With PROXY protocol v2 turned on at
//! the target group, the NLB first sends a binary header with the real client
//! address and, for traffic through a VPC endpoint, an AWS TLV (type `0xEA`,
//! subtype `0x01`) carrying the endpoint id. The proxy logs both.
//!
//! When enabled, the header is mandatory: a connection that does not start with
//! a valid one is closed, otherwise any client could claim any address. Only
//! version 2 is accepted (NLBs do not send version 1).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// AWS's TLV type, and its subtype for the VPC endpoint id.
const PP2_TYPE_AWS: u8 = 0xEA;
const PP2_SUBTYPE_AWS_VPCE_ID: u8 = 0x01;
/// Largest header accepted: addresses (at most 216 bytes for AF_UNIX) plus
/// TLVs. NLBs send well under this.
const MAX_LEN: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("the connection did not start with a PROXY protocol v2 header")]
    Signature,
    #[error("unsupported PROXY protocol version or command {0:#04x}")]
    Version(u8),
    #[error("PROXY header of {0} bytes is too long")]
    TooLong(usize),
    #[error("PROXY header is truncated")]
    Truncated,
    #[error("reading the PROXY header: {0}")]
    Io(std::io::ErrorKind),
}

/// What the header says about the connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyHeader {
    /// The real client, or `None` for a LOCAL command (the balancer's own
    /// health check) or an address family we do not map.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// The VPC endpoint the client came through (AWS TLV), if any.
    pub vpce_id: Option<String>,
}

/// Parses a complete header: the 16 fixed bytes followed by `len` bytes.
pub fn parse(buf: &[u8]) -> Result<ProxyHeader, ProxyError> {
    if buf.len() < 16 {
        return Err(ProxyError::Truncated);
    }
    if buf[..12] != SIGNATURE {
        return Err(ProxyError::Signature);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 || (ver_cmd & 0x0F) > 1 {
        return Err(ProxyError::Version(ver_cmd));
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > MAX_LEN {
        return Err(ProxyError::TooLong(len));
    }
    let body = buf.get(16..16 + len).ok_or(ProxyError::Truncated)?;
    let mut header = ProxyHeader::default();
    let local = ver_cmd & 0x0F == 0;
    let (addr_len, addrs) = match buf[13] >> 4 {
        1 => (12, parse_inet(body)),
        2 => (36, parse_inet6(body)),
        3 => (216, None),
        _ => (0, None),
    };
    if body.len() < addr_len {
        return Err(ProxyError::Truncated);
    }
    if !local {
        if let Some((src, dst)) = addrs {
            header.source = Some(src);
            header.destination = Some(dst);
        }
    }
    header.vpce_id = vpce_id(&body[addr_len..]);
    Ok(header)
}

fn parse_inet(b: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let b = b.get(..12)?;
    let src = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let dst = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
    let sp = u16::from_be_bytes([b[8], b[9]]);
    let dp = u16::from_be_bytes([b[10], b[11]]);
    Some((
        SocketAddr::new(IpAddr::V4(src), sp),
        SocketAddr::new(IpAddr::V4(dst), dp),
    ))
}

fn parse_inet6(b: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let b = b.get(..36)?;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&b[..16]);
    dst.copy_from_slice(&b[16..32]);
    let sp = u16::from_be_bytes([b[32], b[33]]);
    let dp = u16::from_be_bytes([b[34], b[35]]);
    Some((
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(src)), sp),
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(dst)), dp),
    ))
}

/// The VPC endpoint id from the TLVs, if present and printable.
fn vpce_id(mut tlvs: &[u8]) -> Option<String> {
    while tlvs.len() >= 3 {
        let kind = tlvs[0];
        let len = u16::from_be_bytes([tlvs[1], tlvs[2]]) as usize;
        let value = tlvs.get(3..3 + len)?;
        if kind == PP2_TYPE_AWS && value.first() == Some(&PP2_SUBTYPE_AWS_VPCE_ID) {
            let mut id = &value[1..];
            while let [rest @ .., 0] = id {
                id = rest;
            }
            if !id.is_empty()
                && id.len() <= 64
                && id.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            {
                return Some(String::from_utf8_lossy(id).into_owned());
            }
        }
        tlvs = &tlvs[3 + len..];
    }
    None
}

/// Reads exactly one header from the start of a connection.
pub async fn read_header<S: AsyncRead + Unpin>(s: &mut S) -> Result<ProxyHeader, ProxyError> {
    let io = |e: std::io::Error| ProxyError::Io(e.kind());
    let mut buf = vec![0u8; 16];
    s.read_exact(&mut buf).await.map_err(io)?;
    if buf[..12] != SIGNATURE {
        return Err(ProxyError::Signature);
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > MAX_LEN {
        return Err(ProxyError::TooLong(len));
    }
    buf.resize(16 + len, 0);
    s.read_exact(&mut buf[16..]).await.map_err(io)?;
    parse(&buf)
}

/// Builds a v2 PROXY header (tests, and tools that sit in front of the proxy).
pub fn encode(source: SocketAddr, destination: SocketAddr, vpce_id: Option<&str>) -> Vec<u8> {
    let mut body = Vec::new();
    let family = match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            body.extend_from_slice(&s.port().to_be_bytes());
            body.extend_from_slice(&d.port().to_be_bytes());
            0x11
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            body.extend_from_slice(&v6(s).octets());
            body.extend_from_slice(&v6(d).octets());
            body.extend_from_slice(&s.port().to_be_bytes());
            body.extend_from_slice(&d.port().to_be_bytes());
            0x21
        }
    };
    if let Some(id) = vpce_id {
        body.push(PP2_TYPE_AWS);
        body.extend_from_slice(&((id.len() + 1) as u16).to_be_bytes());
        body.push(PP2_SUBTYPE_AWS_VPCE_ID);
        body.extend_from_slice(id.as_bytes());
    }
    let mut out = SIGNATURE.to_vec();
    out.push(0x21);
    out.push(family);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_the_aws_vpce_tlv() {
        let src: SocketAddr = "10.0.3.7:41822".parse().unwrap();
        let dst: SocketAddr = "10.0.1.5:443".parse().unwrap();
        let h = parse(&encode(src, dst, Some("vpce-0123456789abcdef0"))).unwrap();
        assert_eq!(h.source, Some(src));
        assert_eq!(h.destination, Some(dst));
        assert_eq!(h.vpce_id.as_deref(), Some("vpce-0123456789abcdef0"));
        let v6: SocketAddr = "[2001:db8::7]:5000".parse().unwrap();
        let h = parse(&encode(v6, "[2001:db8::1]:443".parse().unwrap(), None)).unwrap();
        assert_eq!(h.source, Some(v6));
        assert_eq!(h.vpce_id, None);
    }

    #[test]
    fn an_nlb_header_as_captured() {
        // PROXY v2, PROXY command, TCP over IPv4, 10.0.0.1:1234 -> 10.0.0.2:443,
        // one AWS TLV with the VPC endpoint id (layout from the NLB docs).
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0x00, 0x22]);
        h.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2, 0x04, 0xD2, 0x01, 0xBB]);
        h.extend_from_slice(&[0xEA, 0x00, 0x13, 0x01]);
        h.extend_from_slice(b"vpce-08d2bf15fac5");
        h.push(0x00); // a trailing NUL some senders pad with is not part of the id
        let parsed = parse(&h).unwrap();
        assert_eq!(parsed.source, Some("10.0.0.1:1234".parse().unwrap()));
        assert_eq!(parsed.vpce_id.as_deref(), Some("vpce-08d2bf15fac5"));
    }

    #[test]
    fn local_command_and_garbage() {
        let mut local = encode(
            "10.0.0.1:1".parse().unwrap(),
            "10.0.0.2:2".parse().unwrap(),
            None,
        );
        local[12] = 0x20;
        assert_eq!(parse(&local).unwrap().source, None);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Err(ProxyError::Signature));
        let mut bad = local.clone();
        bad[12] = 0x11;
        assert_eq!(parse(&bad), Err(ProxyError::Version(0x11)));
        assert_eq!(parse(&local[..20]), Err(ProxyError::Truncated));
        let mut long = local;
        long[14] = 0xFF;
        assert!(matches!(parse(&long), Err(ProxyError::TooLong(_))));
    }
}
