//! Session affinity (Kubernetes `sessionAffinity: ClientIP` with `timeoutSeconds`): a
//! client address keeps the backend it last got from a service as long as its new
//! connections come less than the timeout apart, even when the Maglev table has moved
//! its slot since. Only new flows ask (conntrack keeps established ones), and each one
//! that uses the entry refreshes it, as kube-proxy's `-m recent --rcheck --seconds T
//! --reap` and `--set` do.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    Affinity, AffinityKey, BACKEND_F_DRAINING, Backend, Frontend, Reason, hash::client_hash,
};

use crate::{maglev, maps::AFFINITY_V1, packet::Packet, service};

const NS_PER_S: u64 = 1_000_000_000;

/// The backend for a new flow to an affinity frontend: the client's remembered one
/// while its entry is fresh and the id still holds a backend of the service (the entry
/// is refreshed), else the table's (by client address), which the entry then holds.
#[inline(always)]
pub fn select_backend(pkt: &Packet, frontend: &Frontend) -> Result<(u32, Backend), Reason> {
    select_for(
        pkt.key.src,
        pkt.key.family,
        frontend,
        client_hash(&pkt.key.src),
    )
}

/// The same for any client identity: an address (`family` 4 or 6), or a socket's
/// network namespace (`AFFINITY_FAMILY_NETNS`). `table_hash` places a client without a
/// fresh entry.
#[inline(always)]
pub fn select_for(
    client: [u8; 16],
    family: u8,
    frontend: &Frontend,
    table_hash: u32,
) -> Result<(u32, Backend), Reason> {
    let key = AffinityKey {
        client,
        service_id: frontend.service_id,
        family,
        _pad: [0; 3],
    };
    // SAFETY: plain helper call (the clock of the next-hop cache).
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(entry) = AFFINITY_V1.get_ptr_mut(&key) {
        // SAFETY: a valid map value pointer; copied out at once.
        let seen = unsafe { *entry };
        if fresh(&seen, frontend, now)
            && let Some(backend) = service::backend(seen.backend_id, frontend.service_id)
            && backend.flags & BACKEND_F_DRAINING == 0
        {
            // SAFETY: as above. One aligned 8-byte store; racing CPUs store about the
            // same moment.
            unsafe { (*entry).last_seen_ns = now };
            return Ok((seen.backend_id, backend));
        }
    }
    let (id, backend) = maglev::backend_at(frontend.service_id, table_hash)?;
    let value = Affinity {
        backend_id: id,
        _pad: 0,
        last_seen_ns: now,
    };
    // Creates or replaces the entry in one update. A failed insert (LRU full of locked
    // entries, which does not happen in practice) only means the client's next
    // connection is placed by the table again.
    let _ = AFFINITY_V1.insert(&key, &value, 0);
    Ok((id, backend))
}

/// Whether the entry is younger than the frontend's timeout. A timestamp a little ahead
/// of `now` (another CPU refreshed it after this one read the clock) counts as fresh.
#[inline(always)]
fn fresh(seen: &Affinity, frontend: &Frontend, now: u64) -> bool {
    now.saturating_sub(seen.last_seen_ns) < u64::from(frontend.affinity_timeout_s) * NS_PER_S
}
