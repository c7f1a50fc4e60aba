//! Prometheus metrics of the gateway (`GET /metrics` on the control plane).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label of a per-operation counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// The operation (`extent`, `begin`, `commit`, `landed`, ...).
    pub op: String,
}

/// Label of the engine gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineLabel {
    /// `io_uring` or `portable`.
    pub engine: String,
}

/// Labels of the recovery counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecoveryLabel {
    /// `block` or `object`.
    pub mode: String,
    /// `started`, `running` (succeeded), `failed` or `deleted`.
    pub event: String,
}

/// Every metric of the gateway.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Extent bytes received and written.
    pub bytes_in: Counter,
    /// Data extents written.
    pub extents: Counter,
    /// Zero extents applied.
    pub zero_extents: Counter,
    /// Extent batches written (their extents also count in `extents` and `zero_extents`).
    pub extent_batches: Counter,
    /// Syncs begun.
    pub syncs_begun: Counter,
    /// Recovery points committed.
    pub commits: Counter,
    /// Landed batches made durable.
    pub landed_batches: Counter,
    /// Failed requests by operation.
    pub errors: Family<OpLabel, Counter>,
    /// 1 for the I/O engine volumes use.
    pub io_engine: Family<EngineLabel, Gauge>,
    /// Boot-in-Cloud recoveries by mode and event.
    pub recoveries: Family<RecoveryLabel, Counter>,
    /// Recoveries in progress (neither running, failed nor deleted).
    pub recoveries_active: Gauge,
}

impl Metrics {
    /// Counts a failed operation.
    pub fn error(&self, op: &str) {
        self.errors.get_or_create(&OpLabel { op: op.to_owned() }).inc();
    }

    /// Counts a recovery event.
    pub fn recovery(&self, mode: &str, event: &str) {
        self.recoveries
            .get_or_create(&RecoveryLabel {
                mode: mode.to_owned(),
                event: event.to_owned(),
            })
            .inc();
    }

    /// Encodes every metric in the Prometheus text format.
    pub fn encode(self: &std::sync::Arc<Self>) -> String {
        let mut reg = Registry::with_prefix("tern_gateway");
        reg.register(
            "bytes_in",
            "Extent bytes received and written",
            self.bytes_in.clone(),
        );
        reg.register("extents", "Data extents written", self.extents.clone());
        reg.register("zero_extents", "Zero extents applied", self.zero_extents.clone());
        reg.register(
            "extent_batches",
            "Extent batches written (their extents count in extents and zero_extents too)",
            self.extent_batches.clone(),
        );
        reg.register("syncs_begun", "Syncs begun", self.syncs_begun.clone());
        reg.register("commits", "Recovery points committed", self.commits.clone());
        reg.register(
            "landed_batches",
            "Landed-extent batches made durable",
            self.landed_batches.clone(),
        );
        reg.register("errors", "Failed requests by operation", self.errors.clone());
        reg.register("io_engine", "Block I/O engine in use (1)", self.io_engine.clone());
        reg.register(
            "recoveries",
            "Boot-in-Cloud recoveries by mode and event (started, running, failed, deleted)",
            self.recoveries.clone(),
        );
        reg.register(
            "recoveries_active",
            "Boot-in-Cloud recoveries in progress",
            self.recoveries_active.clone(),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
        out
    }
}
