//! The address family a probe runs over; shared by the plan and the report, so neither imports the
//! other for it.

/// Address family of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4
    V4,
    /// IPv6
    V6,
}
