//! The node's subcommands for the `derpfleet-client` binary (`up`, `status`, `keygen`), kept here so
//! the binary only flattens them in.

use std::path::PathBuf;

use clap::Subcommand;
use derpfleet_proto::key::NodePrivate;

use super::config::{default_control_path, NodeConfig};
use super::disco::DiscoPrivate;
use super::status;

/// Node subcommands.
#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Run the WireGuard node (TUN, DERP, direct-path upgrade) from a TOML config.
    Up {
        /// The node's TOML config file (format: `derpfleet_client::node::config`).
        #[arg(long)]
        config: PathBuf,
    },
    /// Show the running node's peers and paths.
    Status {
        /// Control socket path (default /run/derpfleet-client/<iface>.sock).
        #[arg(long)]
        control: Option<PathBuf>,
        /// TUN interface name, to find the default control socket.
        #[arg(long, default_value = "df0")]
        iface: String,
        /// Print the raw JSON status.
        #[arg(long)]
        json: bool,
    },
    /// Print a new node key and disco key (config lines, public halves as comments).
    Keygen,
}

impl NodeCmd {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            NodeCmd::Up { config } => {
                let cfg = NodeConfig::load(&config)?;
                Ok(super::run(cfg).await?)
            }
            NodeCmd::Status { control, iface, json } => {
                let path = control.unwrap_or_else(|| default_control_path(&iface));
                let st = status::fetch(&path).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&st)?);
                } else {
                    print!("{}", status::render(&st));
                }
                Ok(())
            }
            NodeCmd::Keygen => {
                use std::io::Write;
                let k = NodePrivate::generate();
                let d = DiscoPrivate::generate();
                let text = format!(
                    "private_key = \"{}\"\ndisco_key = \"{}\"\n# public_key = \"{}\"\n# disco_public = \"{}\"\n",
                    k.to_text(),
                    d.to_text(),
                    k.public(),
                    d.public()
                );
                // A closed pipe (`| head`) is not worth a panic.
                let _ = std::io::stdout().write_all(text.as_bytes());
                Ok(())
            }
        }
    }
}
