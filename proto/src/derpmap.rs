//! Tailscale's DERP map JSON (`tailcfg.DERPMap`, spec §6) and its validation.
//!
//! (Filled in with the client library: types, case-insensitive decoding, validation naming the
//! region, node and field at fault.)
