//! Many tokens: per upstream origin, per named upstream, per tenant; bulk
//! refresh and clean-up.

mod maintenance;
mod origin;
mod routing;
mod tenants;

pub use maintenance::{MaintenanceReport, Outcome, ProgressUpdate, RefreshAll};
pub use origin::{InvalidOrigin, Origin};
pub use routing::{AuthRouting, AuthRoutingLayer, UpstreamKey};
pub use tenants::{
    FlushReport, LAST_USED_METADATA_KEY, Tenant, TokenRegistry, TokenRegistryBuilder,
};
