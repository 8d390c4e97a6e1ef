//! Ingress status, computed: the addresses the L7 hop is reached on, for
//! `status.loadBalancer.ingress` of every Ingress it serves. Pure; `kube_writes` writes
//! the result (with `--kube`). Each agent computes the same value, so concurrent writers
//! agree; only a difference is written.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;

use lb_core::cluster::ObjectKey;

/// Status writes: each Ingress with the addresses its status should show.
pub type Updates = Vec<(ObjectKey, Vec<String>)>;

/// The addresses to publish: the flags' when given, else the publish Service's
/// LoadBalancer ingress IPs and externalIPs. Sorted and without duplicates.
pub fn published(flags: &[IpAddr], service: Option<&Service>) -> Vec<String> {
    let mut addresses: Vec<String> = if flags.is_empty() {
        let lb = service
            .and_then(|s| s.status.as_ref())
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.clone());
        let external = service
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.external_ips.clone())
            .unwrap_or_default();
        lb.chain(external).collect()
    } else {
        flags.iter().map(ToString::to_string).collect()
    };
    addresses.sort();
    addresses.dedup();
    addresses
}

/// The addresses an Ingress's status shows now, sorted.
pub fn current(ingress: &Ingress) -> Vec<String> {
    let mut addresses: Vec<String> = ingress
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect();
    addresses.sort();
    addresses
}

/// The status writes that would bring these Ingresses to `wanted`. Nothing is
/// published while `wanted` is empty: an agent that does not know its addresses yet
/// must not erase what another wrote.
pub fn updates<'a>(
    ingresses: impl IntoIterator<Item = (&'a ObjectKey, &'a Ingress)>,
    wanted: &[String],
) -> Updates {
    if wanted.is_empty() {
        return Vec::new();
    }
    ingresses
        .into_iter()
        .filter(|(_, ingress)| current(ingress) != wanted)
        .map(|(key, _)| (key.clone(), wanted.to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingress(ips: &[&str]) -> Ingress {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "web", "namespace": "shop" },
            "status": { "loadBalancer": { "ingress": ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>() } }
        }))
        .unwrap()
    }

    #[test]
    fn the_flags_win_over_the_publish_service() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "xlb-ingress", "namespace": "xlb-system" },
            "spec": { "externalIPs": ["203.0.113.9"] },
            "status": { "loadBalancer": { "ingress": [{ "ip": "203.0.113.7" }, { "hostname": "lb.example.com" }] } }
        }))
        .unwrap();
        assert_eq!(published(&[], Some(&svc)), ["203.0.113.7", "203.0.113.9"]);
        let flag: IpAddr = "203.0.113.1".parse().unwrap();
        assert_eq!(published(&[flag], Some(&svc)), ["203.0.113.1"]);
        assert!(published(&[], None).is_empty());
    }

    #[test]
    fn only_differences_are_written_and_never_an_empty_list() {
        let key = ObjectKey::new("shop", "web");
        let done = ingress(&["203.0.113.9", "203.0.113.7"]);
        let stale = ingress(&["203.0.113.1"]);
        let wanted = vec!["203.0.113.7".to_owned(), "203.0.113.9".to_owned()];
        assert!(updates([(&key, &done)], &wanted).is_empty());
        assert_eq!(
            updates([(&key, &stale)], &wanted),
            [(key.clone(), wanted.clone())]
        );
        assert!(updates([(&key, &stale)], &[]).is_empty());
    }
}
