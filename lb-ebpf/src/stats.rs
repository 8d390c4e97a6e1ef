//! The one sink for counters: per-CPU, so no atomics on the packet path.

use lb_common::Reason;

use crate::maps::{BACKEND_STATS_V1, REASON_STATS_V2, SVC_STATS_V2};

#[inline(always)]
pub fn count_reason(reason: Reason, bytes: u64) {
    if let Some(s) = REASON_STATS_V2.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_service(service_id: u32, bytes: u64, new_flow: bool) {
    if let Some(s) = SVC_STATS_V2.get_ptr_mut(service_id) {
        // SAFETY: as above.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
            if new_flow {
                (*s).new_flows += 1;
            }
        }
    }
}

#[inline(always)]
pub fn count_reply(service_id: u32, bytes: u64) {
    if let Some(s) = SVC_STATS_V2.get_ptr_mut(service_id) {
        // SAFETY: as above.
        unsafe {
            (*s).reply_packets += 1;
            (*s).reply_bytes += bytes;
        }
    }
}

/// A new flow of the service answered with a reset or ICMP unreachable.
#[inline(always)]
pub fn count_rejected(service_id: u32) {
    if let Some(s) = SVC_STATS_V2.get_ptr_mut(service_id) {
        // SAFETY: as above.
        unsafe { (*s).rejected += 1 };
    }
}

/// A new flow of the service dropped for its client's address.
#[inline(always)]
pub fn count_source_denied(service_id: u32) {
    if let Some(s) = SVC_STATS_V2.get_ptr_mut(service_id) {
        // SAFETY: as above.
        unsafe { (*s).source_denied += 1 };
    }
}

/// A flow that got backend `id` just now (new, or re-selected).
#[inline(always)]
pub fn count_backend_new_flow(id: u32) {
    if let Some(s) = BACKEND_STATS_V1.get_ptr_mut(id) {
        // SAFETY: as above.
        unsafe { (*s).new_flows += 1 };
    }
}
