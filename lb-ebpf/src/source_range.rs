//! Source ranges (Kubernetes `loadBalancerSourceRanges`): a service whose frontends carry
//! `FRONTEND_F_SOURCE_RANGES` takes new flows only from clients inside one of its
//! prefixes. Asked for new flows only, as kube-proxy's NAT chains do: a tracked flow
//! keeps going when the ranges change.

use aya_ebpf::btf_maps::lpm_trie::Key;
use lb_common::{Reason, SOURCE_RANGE_LOOKUP_BITS, SourceRangeKey};

use crate::{maps::SRC_RANGES_V1, packet::Packet, stats};

/// `Ok` when the packet's client is inside one of the service's ranges.
#[inline(always)]
pub fn check(pkt: &Packet, service_id: u32) -> Result<(), Reason> {
    let key = Key::new(
        SOURCE_RANGE_LOOKUP_BITS,
        SourceRangeKey::new(service_id, pkt.key.family, pkt.key.src),
    );
    if SRC_RANGES_V1.get(&key).is_some() {
        return Ok(());
    }
    stats::count_source_denied(service_id);
    Err(Reason::DropSourceRange)
}
