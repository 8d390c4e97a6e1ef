//! Building Ethernet frames for packet tests, fuzzing and benchmarks, with etherparse
//! computing every checksum from scratch: an implementation independent of the data
//! path's incremental updates, so comparing the two checks them.

use std::net::IpAddr;

use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, SingleVlanHeader,
    TcpHeader, UdpHeader, VlanId, VlanPcp,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp { sport: u16, dport: u16, syn: bool },
    Udp { sport: u16, dport: u16 },
}

/// One TCP or UDP packet, described by its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    /// IPv4 options (a multiple of 4 bytes, at most 40); ignored for IPv6.
    pub ipv4_options: Vec<u8>,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// IPv4 UDP only: send without a checksum (field 0).
    pub udp_no_checksum: bool,
    /// TCP only: the FIN flag (a segment that closes its side), and the RST flag.
    pub fin: bool,
    pub rst: bool,
}

impl Frame {
    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Frame {
        Frame {
            src_mac: [0x02, 0, 0, 0, 0x01, 0x02],
            dst_mac: [0x02, 0, 0, 0, 0x01, 0x01],
            vlan: None,
            src,
            dst,
            ttl: 64,
            ipv4_options: Vec::new(),
            l4: L4::Tcp {
                sport,
                dport,
                syn: false,
            },
            payload: b"GET / HTTP/1.1\r\nHost: xlb\r\n\r\n".to_vec(),
            udp_no_checksum: false,
            fin: false,
            rst: false,
        }
    }

    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Frame {
        Frame {
            l4: L4::Udp { sport, dport },
            payload: b"xlb udp probe".to_vec(),
            ..Frame::tcp(src, sport, dst, dport)
        }
    }

    #[must_use]
    pub fn syn(mut self) -> Frame {
        if let L4::Tcp { syn, .. } = &mut self.l4 {
            *syn = true;
        }
        self.payload.clear();
        self
    }

    /// This segment past the handshake: SYN clear (an ACK), the payload kept.
    #[must_use]
    pub fn established(mut self) -> Frame {
        if let L4::Tcp { syn, .. } = &mut self.l4 {
            *syn = false;
        }
        self
    }

    /// This segment with FIN set, without a payload.
    #[must_use]
    pub fn fin(mut self) -> Frame {
        self.fin = true;
        self.payload.clear();
        self
    }

    /// This segment with RST set, without a payload.
    #[must_use]
    pub fn rst(mut self) -> Frame {
        self.rst = true;
        self.payload.clear();
        self
    }

    #[must_use]
    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Frame {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    pub fn ports(&self) -> (u16, u16) {
        match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
        }
    }

    pub fn set_ports(&mut self, sport: u16, dport: u16) {
        match &mut self.l4 {
            L4::Tcp {
                sport: s, dport: d, ..
            }
            | L4::Udp { sport: s, dport: d } => {
                *s = sport;
                *d = dport;
            }
        }
    }

    /// The frame's bytes with every checksum computed by etherparse.
    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let ip_ether = match self.dst {
            IpAddr::V4(_) => EtherType::IPV4,
            IpAddr::V6(_) => EtherType::IPV6,
        };
        let outer = if self.vlan.is_some() {
            EtherType::VLAN_TAGGED_FRAME
        } else {
            ip_ether
        };
        Ethernet2Header {
            source: self.src_mac,
            destination: self.dst_mac,
            ether_type: outer,
        }
        .write(&mut out)
        .expect("write to Vec");
        if let Some(id) = self.vlan {
            SingleVlanHeader {
                pcp: VlanPcp::ZERO,
                drop_eligible_indicator: false,
                vlan_id: VlanId::try_new(id).expect("vlan id < 4096"),
                ether_type: ip_ether,
            }
            .write(&mut out)
            .expect("write to Vec");
        }
        let (proto, l4_len) = match self.l4 {
            L4::Tcp { .. } => (IpNumber::TCP, TcpHeader::MIN_LEN),
            L4::Udp { .. } => (IpNumber::UDP, UdpHeader::LEN),
        };
        let l4_total = u16::try_from(l4_len + self.payload.len()).expect("small payload");
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut ip = Ipv4Header::new(l4_total, self.ttl, proto, s.octets(), d.octets())
                    .expect("payload fits");
                ip.options = self
                    .ipv4_options
                    .as_slice()
                    .try_into()
                    .expect("options: a multiple of 4 bytes, at most 40");
                // Recompute the total length now that the header has grown.
                ip.set_payload_len(usize::from(l4_total))
                    .expect("payload fits");
                ip.header_checksum = ip.calc_header_checksum();
                ip.write(&mut out).expect("write to Vec");
                match self.l4 {
                    L4::Tcp { sport, dport, syn } => {
                        let mut tcp = tcp_header(self, sport, dport, syn);
                        tcp.checksum = tcp
                            .calc_checksum_ipv4(&ip, &self.payload)
                            .expect("checksum");
                        tcp.write(&mut out).expect("write to Vec");
                    }
                    L4::Udp { sport, dport } => {
                        let mut udp =
                            UdpHeader::with_ipv4_checksum(sport, dport, &ip, &self.payload)
                                .expect("checksum");
                        if self.udp_no_checksum {
                            udp.checksum = 0;
                        }
                        udp.write(&mut out).expect("write to Vec");
                    }
                }
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let ip = Ipv6Header {
                    traffic_class: 0,
                    flow_label: Ipv6FlowLabel::ZERO,
                    payload_length: l4_total,
                    next_header: proto,
                    hop_limit: self.ttl,
                    source: s.octets(),
                    destination: d.octets(),
                };
                ip.write(&mut out).expect("write to Vec");
                match self.l4 {
                    L4::Tcp { sport, dport, syn } => {
                        let mut tcp = tcp_header(self, sport, dport, syn);
                        tcp.checksum = tcp
                            .calc_checksum_ipv6(&ip, &self.payload)
                            .expect("checksum");
                        tcp.write(&mut out).expect("write to Vec");
                    }
                    L4::Udp { sport, dport } => {
                        UdpHeader::with_ipv6_checksum(sport, dport, &ip, &self.payload)
                            .expect("checksum")
                            .write(&mut out)
                            .expect("write to Vec");
                    }
                }
            }
            _ => panic!("source and destination of different families"),
        }
        out.extend_from_slice(&self.payload);
        out
    }
}

/// A TCP header as the tests send it: a SYN, or an ACK carrying data, with FIN or RST
/// where the frame asks for them.
fn tcp_header(frame: &Frame, sport: u16, dport: u16, syn: bool) -> TcpHeader {
    let mut tcp = TcpHeader::new(sport, dport, 0x1000_0000, 64240);
    tcp.syn = syn;
    tcp.ack = !syn;
    tcp.fin = frame.fin;
    tcp.rst = frame.rst;
    tcp
}

/// Checks every checksum of a frame from scratch (IPv4 header, TCP/UDP with its
/// pseudo-header, ICMP, ICMPv6 with its pseudo-header). `Ok(())` for frames that are
/// not TCP, UDP or ICMP over IP.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let packet = SlicedPacket::from_ethernet(frame).map_err(|e| format!("unparsable: {e}"))?;
    let Some(net) = &packet.net else {
        return Ok(());
    };
    match net {
        NetSlice::Ipv4(ip) => {
            let header = ip.header().to_header();
            if header.calc_header_checksum() != header.header_checksum {
                return Err("bad IPv4 header checksum".into());
            }
            match &packet.transport {
                Some(TransportSlice::Tcp(tcp)) => {
                    let want = tcp
                        .to_header()
                        .calc_checksum_ipv4(&header, tcp.payload())
                        .map_err(|e| e.to_string())?;
                    (want == tcp.checksum()).then_some(()).ok_or_else(|| {
                        format!("bad TCP checksum {:#06x} != {want:#06x}", tcp.checksum())
                    })
                }
                Some(TransportSlice::Udp(udp)) if udp.checksum() != 0 => {
                    let want = udp
                        .to_header()
                        .calc_checksum_ipv4(&header, udp.payload())
                        .map_err(|e| e.to_string())?;
                    (want == udp.checksum()).then_some(()).ok_or_else(|| {
                        format!("bad UDP checksum {:#06x} != {want:#06x}", udp.checksum())
                    })
                }
                // Over the message alone; summed with its checksum it folds to zero.
                Some(TransportSlice::Icmpv4(icmp)) => (lb_common::csum::checksum(icmp.slice(), 0)
                    == 0)
                    .then_some(())
                    .ok_or_else(|| format!("bad ICMP checksum {:#06x}", icmp.checksum())),
                _ => Ok(()),
            }
        }
        NetSlice::Ipv6(ip) => {
            let header = ip.header().to_header();
            match &packet.transport {
                Some(TransportSlice::Tcp(tcp)) => {
                    let want = tcp
                        .to_header()
                        .calc_checksum_ipv6(&header, tcp.payload())
                        .map_err(|e| e.to_string())?;
                    (want == tcp.checksum()).then_some(()).ok_or_else(|| {
                        format!("bad TCP checksum {:#06x} != {want:#06x}", tcp.checksum())
                    })
                }
                Some(TransportSlice::Udp(udp)) => {
                    let want = udp
                        .to_header()
                        .calc_checksum_ipv6(&header, udp.payload())
                        .map_err(|e| e.to_string())?;
                    (want == udp.checksum()).then_some(()).ok_or_else(|| {
                        format!("bad UDP checksum {:#06x} != {want:#06x}", udp.checksum())
                    })
                }
                Some(TransportSlice::Icmpv6(icmp)) => {
                    // RFC 8200 8.1: addresses, upper-layer length, next header (58).
                    let mut pseudo = header.source.to_vec();
                    pseudo.extend_from_slice(&header.destination);
                    let len = u32::try_from(icmp.slice().len()).map_err(|e| e.to_string())?;
                    pseudo.extend_from_slice(&len.to_be_bytes());
                    pseudo.extend_from_slice(&[0, 0, 0, 58]);
                    let mut all = pseudo;
                    all.extend_from_slice(icmp.slice());
                    (lb_common::csum::checksum(&all, 0) == 0)
                        .then_some(())
                        .ok_or_else(|| format!("bad ICMPv6 checksum {:#06x}", icmp.checksum()))
                }
                _ => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ICMP and ICMPv6 checksums are verified, and a flipped byte is caught.
    #[test]
    fn icmp_checksums_are_verified() {
        let quoted = [0x45u8; 28];
        let v4 = {
            let mut out = Vec::new();
            etherparse::PacketBuilder::ethernet2([2; 6], [4; 6])
                .ipv4([203, 0, 113, 10], [198, 51, 100, 2], 64)
                .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::Port,
                ))
                .write(&mut out, &quoted)
                .expect("write");
            out
        };
        let v6 = {
            let mut out = Vec::new();
            let vip = "2001:db8:f::10"
                .parse::<std::net::Ipv6Addr>()
                .expect("addr");
            let client = "2001:db8:c::2".parse::<std::net::Ipv6Addr>().expect("addr");
            etherparse::PacketBuilder::ethernet2([2; 6], [4; 6])
                .ipv6(vip.octets(), client.octets(), 64)
                .icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(
                    etherparse::icmpv6::DestUnreachableCode::Port,
                ))
                .write(&mut out, &quoted)
                .expect("write");
            out
        };
        for frame in [v4, v6] {
            assert_eq!(verify_checksums(&frame), Ok(()));
            let mut bad = frame.clone();
            *bad.last_mut().expect("bytes") ^= 1;
            assert!(verify_checksums(&bad).is_err(), "a flipped byte is caught");
        }
    }
}
