//! Why the XDP program let a packet go the way it did. Every exit of the program counts
//! exactly one reason (per-CPU packets and bytes in `REASON_STATS_V2`, indexed by the
//! discriminant), so the counters add up to the packets the program saw.

/// The kernel's XDP verdicts (`enum xdp_action`).
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $name:ident = $value:literal => $metric:literal, $action:ident;)*) => {
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Reason {
            $($(#[doc = $doc])* $name = $value,)*
        }

        impl Reason {
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            /// Stable `snake_case` name, used as the metrics label.
            pub const fn name(self) -> &'static str {
                match self { $(Reason::$name => $metric,)* }
            }

            /// The verdict the program returns for this reason when it has no better
            /// one (a redirect's verdict comes from the redirect helper).
            pub const fn action(self) -> u32 {
                match self { $(Reason::$name => $action,)* }
            }

            pub const fn from_u32(value: u32) -> Option<Reason> {
                match value { $($value => Some(Reason::$name),)* _ => None }
            }
        }
    };
}

reasons! {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    PassNotIp = 0 => "pass_not_ip", XDP_PASS;
    /// IP, but not TCP or UDP directly after the IP header (ICMP, SCTP, IPv6 extension
    /// headers).
    PassNotL4 = 1 => "pass_not_l4", XDP_PASS;
    /// TCP/UDP for no frontend and no tracked reply.
    PassNotFrontend = 2 => "pass_not_frontend", XDP_PASS;
    /// Headers too short or inconsistent to identify a frontend; the kernel decides.
    PassMalformed = 3 => "pass_malformed", XDP_PASS;
    /// IP fragment that is not for a frontend (or cannot be attributed to one).
    PassFragment = 4 => "pass_fragment", XDP_PASS;
    /// TTL / hop limit would expire here: handed untranslated to the kernel, which
    /// answers with ICMP time exceeded.
    PassTtlExceeded = 5 => "pass_ttl_exceeded", XDP_PASS;
    /// Translated, but the next hop's MAC is not resolved yet: the kernel forwards it
    /// and resolves the neighbour for the packets that follow.
    PassNoNeigh = 6 => "pass_no_neigh", XDP_PASS;
    /// Translated, but the FIB does not forward it from XDP (local destination,
    /// forwarding disabled, fragmentation needed, unreachable ...): the kernel handles it.
    PassFibOther = 7 => "pass_fib_other", XDP_PASS;
    /// Translated client -> backend packet sent on through a devmap redirect.
    FwdRedirect = 8 => "fwd_redirect", XDP_REDIRECT;
    /// Translated client -> backend packet sent back out of the interface it came in on
    /// (a devmap redirect to that interface; `XDP_TX` when it is not in the devmap).
    FwdTx = 9 => "fwd_tx", XDP_REDIRECT;
    /// Translated backend -> client reply sent on through a devmap redirect.
    ReplyRedirect = 10 => "reply_redirect", XDP_REDIRECT;
    /// Translated backend -> client reply sent out of the interface it came in on (a
    /// devmap redirect to that interface; `XDP_TX` when it is not in the devmap).
    ReplyTx = 11 => "reply_tx", XDP_REDIRECT;
    /// The frontend's service has no backend (empty Maglev slot or no table), and drops
    /// new flows then; or it rejects, but this packet gets no answer (a TCP reset, a
    /// source that must not be answered, IPv4 options on UDP).
    DropNoBackend = 12 => "drop_no_backend", XDP_DROP;
    /// Addressed to a frontend, but the L4 header is inconsistent with the IP header.
    DropMalformed = 13 => "drop_malformed", XDP_DROP;
    /// First fragment addressed to a frontend: fragments cannot be balanced per flow.
    DropFragment = 14 => "drop_fragment", XDP_DROP;
    /// Backend and frontend families differ (the agent never writes that; defence).
    DropFamilyMismatch = 15 => "drop_family_mismatch", XDP_DROP;
    /// A new TCP flow to a service without backends that rejects (kube-proxy's REJECT):
    /// answered with a TCP reset, sent back out of the interface it came in on (a devmap
    /// redirect to that interface; `XDP_TX` when it is not in the devmap).
    RejectTcpReset = 16 => "reject_tcp_reset", XDP_REDIRECT;
    /// A new UDP flow to a service without backends that rejects: answered with ICMP
    /// port unreachable (ICMPv6 for IPv6), sent back out of the interface it came in on
    /// (as a reset is).
    RejectIcmpUnreachable = 17 => "reject_icmp_unreachable", XDP_REDIRECT;
    /// A new flow from a client outside the service's source ranges
    /// (`loadBalancerSourceRanges`).
    DropSourceRange = 18 => "drop_source_range", XDP_DROP;
    /// A new flow to be source-NATed found no free port for its backend in the node's range
    /// (`--snat-ports`) within `SNAT_ATTEMPTS` tries.
    DropSnatExhausted = 19 => "drop_snat_exhausted", XDP_DROP;
    /// A new flow to be source-NATed or encapsulated (DSR), but the agent gave no node
    /// address of its family.
    DropNoSnatAddress = 20 => "drop_no_snat_address", XDP_DROP;
    /// Translated client -> backend packet handed to the kernel's stack: the next hop's
    /// device is not one the program redirects to (a pod's veth, an overlay device, a
    /// driver without XDP transmit); the kernel forwards it.
    FwdStack = 21 => "fwd_stack", XDP_PASS;
    /// Translated backend -> client reply handed to the kernel's stack, for the same
    /// reason.
    ReplyStack = 22 => "reply_stack", XDP_PASS;
    /// A local backend's reply translated back by the tc egress program on its way out
    /// of the node (counted by that program, not by XDP).
    ReplyEgress = 23 => "reply_egress", XDP_PASS;
    /// An ICMP error about a translated flow (fragmentation needed, packet too big,
    /// unreachable, time exceeded) translated to its client, the quoted packet as the
    /// client sent it, and sent on as a reply is: one about a source-NATed flow (sent to
    /// node:port), or one about a flow translated at the destination only (quoting the
    /// backend) that passes through XDP or, sent or forwarded by the node itself, leaves
    /// through the tc egress program (counted there).
    ReplyIcmp = 24 => "reply_icmp", XDP_REDIRECT;
    /// An ICMP error from the client's side about a reply (sent to the frontend, quoting
    /// frontend -> client) translated to the flow's backend, the quoted packet as the
    /// backend sent it, and sent on as a packet to the backend is.
    FwdIcmp = 25 => "fwd_icmp", XDP_REDIRECT;
    /// DSR: the frame had no room for the outer header (or carries a VLAN tag, which
    /// encapsulation does not handle).
    DropDsrEncap = 26 => "drop_dsr_encap", XDP_DROP;
    /// DSR: an encapsulated packet for a backend on this node, decapsulated, translated
    /// to the backend and handed on by the tc ingress program (counted by that program;
    /// XDP counted the encapsulated packet as `pass_not_l4`).
    DsrDelivered = 27 => "dsr_delivered", XDP_PASS;
    /// DSR: an encapsulated packet for a backend on this node whose inner packet is not a
    /// whole, unfragmented TCP/UDP packet of the outer header's family, or that could not
    /// be decapsulated: dropped by the tc ingress program.
    DropDsrMalformed = 28 => "drop_dsr_malformed", XDP_DROP;
    /// DSR: a client's packet that does not fit the next hop's MTU once encapsulated
    /// (the FIB's "fragmentation needed"), answered with ICMP "fragmentation needed" /
    /// `ICMPv6` "packet too big" quoting it, from the frontend, advertising the MTU less
    /// the outer header, and sent back out of the interface it came in on.
    DsrIcmpTooBig = 29 => "dsr_icmp_too_big", XDP_REDIRECT;
    /// DSR: a client's packet too big to encapsulate that must not be answered: IPv4
    /// without "don't fragment" (the outer header may not be fragmented: it is
    /// decapsulated before any reassembly), IPv4 with options, or from a source that
    /// must not get errors. Dropped, as Katran drops it.
    DropDsrTooBig = 30 => "drop_dsr_too_big", XDP_DROP;
}

impl Reason {
    /// Number of reasons; the size of `REASON_STATS_V2`.
    #[expect(clippy::cast_possible_truncation, reason = "a handful of reasons")]
    pub const COUNT: u32 = Reason::ALL.len() as u32;
}
