//! `tern-gateway plan`: how many gateways a fleet needs and which disks go where.
//!
//! The seed's rule: the number of gateways does not depend on the number of hosts; each source
//! disk is one volume attached to a gateway, and a cloud limits the volumes per instance. A
//! host's disks stay on one gateway, because one recovery point snapshots all of them at one
//! moment. Hosts are placed largest first into the first gateway with room (first-fit
//! decreasing), which is within 11/9 of the optimum and optimal for equal-sized hosts.

use serde::Serialize;

/// A host to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetHost {
    /// Host name.
    pub name: String,
    /// Number of disks.
    pub disks: u32,
}

/// One gateway of the plan.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GatewayPlan {
    /// Volumes attached.
    pub volumes: u32,
    /// Hosts and their disk counts.
    pub hosts: Vec<(String, u32)>,
}

/// Why no plan exists.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("host {host} has {disks} disks but a gateway can attach only {max} volumes")]
    HostTooLarge { host: String, disks: u32, max: u32 },
    #[error("host {0} has no disks")]
    NoDisks(String),
}

/// Places `hosts` on gateways that attach at most `max_volumes` volumes each.
pub fn plan(hosts: &[FleetHost], max_volumes: u32) -> Result<Vec<GatewayPlan>, PlanError> {
    let mut sorted: Vec<&FleetHost> = hosts.iter().collect();
    sorted.sort_by(|a, b| b.disks.cmp(&a.disks).then_with(|| a.name.cmp(&b.name)));
    let mut gateways: Vec<GatewayPlan> = Vec::new();
    for h in sorted {
        if h.disks == 0 {
            return Err(PlanError::NoDisks(h.name.clone()));
        }
        if h.disks > max_volumes {
            return Err(PlanError::HostTooLarge {
                host: h.name.clone(),
                disks: h.disks,
                max: max_volumes,
            });
        }
        match gateways.iter_mut().find(|g| g.volumes + h.disks <= max_volumes) {
            Some(g) => {
                g.volumes += h.disks;
                g.hosts.push((h.name.clone(), h.disks));
            }
            None => gateways.push(GatewayPlan {
                volumes: h.disks,
                hosts: vec![(h.name.clone(), h.disks)],
            }),
        }
    }
    Ok(gateways)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fleet(n: usize, disks: u32) -> Vec<FleetHost> {
        (0..n)
            .map(|i| FleetHost {
                name: format!("h{i}"),
                disks,
            })
            .collect()
    }

    #[test]
    fn seed_example_ten_hosts_two_disks_one_gateway() {
        let p = plan(&fleet(10, 2), 20).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].volumes, 20);
    }

    #[test]
    fn gateways_follow_disks_not_hosts() {
        assert_eq!(plan(&fleet(11, 2), 20).unwrap().len(), 2);
        assert_eq!(plan(&fleet(40, 1), 20).unwrap().len(), 2);
        assert!(matches!(
            plan(&fleet(1, 21), 20),
            Err(PlanError::HostTooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn every_disk_placed_once_within_limits(disks in proptest::collection::vec(1u32..=8, 0..60), max in 8u32..=40) {
            let hosts: Vec<FleetHost> = disks.iter().enumerate().map(|(i, d)| FleetHost { name: format!("h{i}"), disks: *d }).collect();
            let p = plan(&hosts, max).unwrap();
            let total: u32 = disks.iter().sum();
            prop_assert_eq!(p.iter().map(|g| g.volumes).sum::<u32>(), total);
            prop_assert!(p.iter().all(|g| g.volumes <= max && g.volumes == g.hosts.iter().map(|h| h.1).sum::<u32>()));
            prop_assert_eq!(p.iter().map(|g| g.hosts.len()).sum::<usize>(), hosts.len());
            // Never worse than 2x the lower bound.
            let lower = total.div_ceil(max) as usize;
            prop_assert!(p.len() <= (2 * lower).max(1) || total == 0);
        }
    }
}
