//! What can be checked of `terraform/` without cloud credentials or provider downloads:
//! - `terraform fmt -check -recursive` over everything (also proves every file parses as HCL);
//! - the provider-free `modules/derpmap`: `init -backend=false`, `validate`, `plan` and `apply` on local
//!   state with `example.tfvars`; its JSON output must parse and validate with `derpfleet_proto::derpmap`,
//!   and its headscale YAML must describe the same map in the spelling headscale's YAML decoder needs;
//! - its input validation rejects bad fleets with a clear message;
//! - the relay node's cloud-init template renders to YAML that installs the repository's systemd unit;
//! - the AWS example's module tree resolves offline (`get`, `providers`): only aws and random are needed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use derpfleet_e2e::scratch::ScratchDir;
use derpfleet_e2e::{success_stdout, workspace_root};
use derpfleet_proto::derpmap::DerpMap;

/// The terraform CLI: `DERPFLEET_TERRAFORM` (set by `scripts/test-all.sh`, which checks it is >= 1.5), else
/// `terraform` on PATH.
fn terraform_bin() -> PathBuf {
    std::env::var_os("DERPFLEET_TERRAFORM").map_or_else(|| PathBuf::from("terraform"), PathBuf::from)
}

/// `terraform args...` in `dir`, with a CLI config of our own (the environment's points to a missing
/// file), no version check call-home, and a time limit.
fn terraform(dir: &Path, cli_config: &Path, args: &[&str]) -> Result<Output> {
    let out = Command::new("timeout")
        .args(["--kill-after=10", "300"])
        .arg(terraform_bin())
        .args(args)
        .current_dir(dir)
        .env("TF_CLI_CONFIG_FILE", cli_config)
        .env("CHECKPOINT_DISABLE", "1")
        .env("TF_IN_AUTOMATION", "1")
        .env("TF_INPUT", "0")
        .output()
        .with_context(|| format!("running {} (scripts/test-all.sh locates it)", terraform_bin().display()))?;
    Ok(out)
}

fn terraform_ok(dir: &Path, cli_config: &Path, args: &[&str]) -> Result<String> {
    success_stdout(&format!("terraform {}", args.join(" ")), terraform(dir, cli_config, args)?)
}

/// Copies the files of one module directory (not subdirectories) into `to`.
fn copy_module(from: &Path, to: &Path) -> Result<()> {
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

struct Fixture {
    scratch: ScratchDir,
    cli_config: PathBuf,
}

impl Fixture {
    fn new(tag: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
        let scratch = ScratchDir::new(&format!("derpfleet-e2e-{tag}-{}-{nanos}", std::process::id()))?;
        let cli_config = scratch.join("terraformrc");
        std::fs::write(&cli_config, "# derpfleet tests: no plugin cache, no credentials\n")?;
        Ok(Self { scratch, cli_config })
    }

    /// A fresh copy of `terraform/modules/derpmap`, initialised.
    fn derpmap_module(&self, name: &str) -> Result<PathBuf> {
        let dir = self.scratch.join(name);
        std::fs::create_dir_all(&dir)?;
        copy_module(&workspace_root().join("terraform/modules/derpmap"), &dir)?;
        terraform_ok(&dir, &self.cli_config, &["init", "-backend=false", "-no-color"])?;
        Ok(dir)
    }
}

#[test]
fn terraform_fmt_check_recursive() -> Result<()> {
    let fx = Fixture::new("tf-fmt")?;
    let out = terraform(
        &workspace_root().join("terraform"),
        &fx.cli_config,
        &["fmt", "-check", "-recursive", "-diff"],
    )?;
    assert!(
        out.status.success(),
        "terraform fmt -check found unformatted files:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// YAML to JSON, with integer mapping keys turned into decimal strings (as JSON spells them); every
/// string key must be lowercase, the spelling headscale's YAML decoder matches Go field names with.
fn yaml_to_json(v: &serde_yaml::Value) -> Result<serde_json::Value> {
    use serde_yaml::Value as Y;
    Ok(match v {
        Y::Mapping(m) => {
            let mut out = serde_json::Map::new();
            for (k, val) in m {
                let key = match k {
                    Y::String(s) => {
                        ensure!(!s.chars().any(|c| c.is_ascii_uppercase()), "key {s:?} is not lowercase");
                        s.clone()
                    }
                    Y::Number(n) => n.to_string(),
                    other => anyhow::bail!("unexpected mapping key {other:?}"),
                };
                out.insert(key, yaml_to_json(val)?);
            }
            serde_json::Value::Object(out)
        }
        Y::Sequence(s) => serde_json::Value::Array(s.iter().map(yaml_to_json).collect::<Result<_>>()?),
        other => serde_json::to_value(other)?,
    })
}

/// Headscale's `derp.paths` file read back as a DERP map. Region keys must be YAML integers: headscale
/// decodes them into Go ints and rejects quoted strings there.
fn headscale_yaml_as_map(yaml: &str) -> Result<DerpMap> {
    let v: serde_yaml::Value = serde_yaml::from_str(yaml).context("headscale YAML does not parse")?;
    let regions = v.get("regions").and_then(|r| r.as_mapping()).context("no `regions` mapping")?;
    for k in regions.keys() {
        ensure!(k.is_i64(), "region key {k:?} is not a YAML integer");
    }
    let json = serde_json::to_vec(&yaml_to_json(&v)?)?;
    DerpMap::from_json(&json).map_err(|e| anyhow::anyhow!("headscale YAML as a DERP map: {e}"))
}

#[test]
fn derpmap_module_plans_and_outputs_a_valid_derp_map() -> Result<()> {
    let fx = Fixture::new("tf-derpmap")?;
    let dir = fx.derpmap_module("derpmap")?;
    let cfg = &fx.cli_config;
    let validate = terraform_ok(&dir, cfg, &["validate", "-no-color"])?;
    assert!(validate.contains("Success"), "validate: {validate}");
    terraform_ok(&dir, cfg, &["plan", "-no-color", "-var-file=example.tfvars", "-out=tfplan"])?;
    terraform_ok(&dir, cfg, &["apply", "-no-color", "-auto-approve", "tfplan"])?;
    assert!(dir.join("terraform.tfstate").exists(), "apply must write local state in the scratch dir");

    let outputs: serde_json::Value = serde_json::from_str(&terraform_ok(&dir, cfg, &["output", "-json"])?)?;
    let json = outputs["derp_map_json"]["value"].as_str().context("derp_map_json output missing")?;
    assert!(!json.contains("null"), "null fields must be omitted, not encoded: {json}");

    let map = DerpMap::from_json(json.as_bytes()).map_err(|e| anyhow::anyhow!("{e}\n{json}"))?;
    assert!(map.omit_default_regions, "OmitDefaultRegions must be set by default");
    assert_eq!(map.regions.keys().copied().collect::<Vec<_>>(), vec![900, 901]);
    let fra = &map.regions[&900];
    assert_eq!((fra.region_code.as_str(), fra.region_name.as_str()), ("fra", "Frankfurt"));
    assert_eq!((fra.latitude, fra.longitude), (50.11, 8.68));
    let names: Vec<&str> = fra.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["900a", "900b", "900c"], "node order is priority order and must be kept");
    assert!(fra.nodes.iter().all(|n| n.region_id == 900));
    assert_eq!(fra.nodes[0].host_name, "derp900a.example.net");
    assert_eq!(fra.nodes[0].ipv4, "203.0.113.10");
    assert!(fra.nodes[0].can_port80);
    assert_eq!(fra.nodes[2].ipv6, "none");
    let iad = &map.regions[&901];
    assert_eq!(iad.nodes[0].stun_port, 3478);
    assert_eq!(iad.nodes[0].derp_port, 443);
    assert!(iad.nodes[1].stun_only && iad.nodes[1].host_is_ip());
    assert!(!iad.nodes[0].stun_only && !iad.nodes[0].can_port80);
    assert_eq!(map.region_score(901), 1.5);
    assert_eq!(map.region_score(900), 1.0);

    // The Terraform object output and the JSON string agree.
    let obj = serde_json::to_vec(&outputs["derp_map"]["value"])?;
    assert_eq!(DerpMap::from_json(&obj).map_err(|e| anyhow::anyhow!("{e}"))?, map);

    // Headscale's file describes the very same map.
    let yaml = outputs["headscale_derp_yaml"]["value"].as_str().context("headscale_derp_yaml missing")?;
    assert_eq!(headscale_yaml_as_map(yaml)?, map, "headscale YAML differs from the JSON map:\n{yaml}");
    Ok(())
}

#[test]
fn derpmap_module_rejects_bad_fleets() -> Result<()> {
    let fx = Fixture::new("tf-derpmap-bad")?;
    let dir = fx.derpmap_module("derpmap")?;
    let node = |name: &str| format!(r#"{{ name = "{name}", host_name = "h.example.net" }}"#);
    let region = |id: i64, nodes: &[String]| {
        format!(
            r#"{{ region_id = {id}, region_code = "r{id}", region_name = "R", nodes = [{}] }}"#,
            nodes.join(",")
        )
    };
    let cases = [
        (format!("[{}]", region(5, &[node("5a")])), "900-999"),
        (
            format!("[{}, {}]", region(900, &[node("x")]), region(901, &[node("x")])),
            "unique across all regions",
        ),
        (
            format!("[{}, {}]", region(900, &[node("a")]), region(900, &[node("b")])),
            "region_id values must be unique",
        ),
        (format!("[{}]", region(900, &[])), "at least one node"),
        (
            format!(
                "[{}]",
                region(900, &[r#"{ name = "a", host_name = "h", stun_port = 70000 }"#.to_string()])
            ),
            "stun_port",
        ),
    ];
    for (regions, expected) in cases {
        let var = format!("regions={regions}");
        let out = terraform(&dir, &fx.cli_config, &["plan", "-no-color", "-var", &var])?;
        let err = String::from_utf8_lossy(&out.stderr).replace('\n', " ");
        assert!(!out.status.success(), "plan must fail for {regions}");
        assert!(err.contains(expected), "error for {regions} should mention {expected:?}: {err}");
    }
    Ok(())
}

#[test]
fn relay_node_cloud_init_renders_and_installs_the_unit() -> Result<()> {
    let fx = Fixture::new("tf-cloudinit")?;
    let dir = fx.scratch.join("render");
    std::fs::create_dir_all(&dir)?;
    let root = workspace_root();
    let tpl = root.join("terraform/modules/relay-node/cloud-init.yaml.tftpl");
    let unit_path = root.join("deploy/derpfleet-relay.service");
    let key = "ab".repeat(32);
    let main = format!(
        r#"output "user_data" {{
  value = templatefile({tpl:?}, {{
    mesh_key      = "{key}\n"
    env_file      = "DERPFLEET_ARGS=\"-hostname derp900a.example.net\"\n"
    unit          = file({unit:?})
    binary_url    = "https://example.net/derpfleet-relay"
    binary_sha256 = "{sha}"
  }})
}}
"#,
        tpl = tpl.display().to_string(),
        unit = unit_path.display().to_string(),
        sha = "0".repeat(64),
    );
    std::fs::write(dir.join("main.tf"), main)?;
    terraform_ok(&dir, &fx.cli_config, &["init", "-backend=false", "-no-color"])?;
    terraform_ok(&dir, &fx.cli_config, &["apply", "-no-color", "-auto-approve"])?;
    let out: serde_json::Value =
        serde_json::from_str(&terraform_ok(&dir, &fx.cli_config, &["output", "-json"])?)?;
    let user_data = out["user_data"]["value"].as_str().context("no user_data")?;
    assert!(user_data.starts_with("#cloud-config\n"), "cloud-init needs the #cloud-config header");
    let doc: serde_yaml::Value = serde_yaml::from_str(user_data).context("cloud-init is not YAML")?;
    let files = doc["write_files"].as_sequence().context("write_files")?;
    let file = |path: &str| files.iter().find(|f| f["path"].as_str() == Some(path));
    let unit = file("/etc/systemd/system/derpfleet-relay.service").context("unit not written")?;
    assert_eq!(unit["content"].as_str(), Some(std::fs::read_to_string(&unit_path)?.as_str()));
    let mesh = file("/etc/derpfleet/mesh.key").context("mesh key not written")?;
    assert_eq!(mesh["permissions"].as_str(), Some("0600"));
    assert_eq!(mesh["content"].as_str().map(str::trim), Some(key.as_str()));
    let runcmd = serde_yaml::to_string(&doc["runcmd"])?;
    assert!(runcmd.contains("sha256sum -c"), "the binary must be checked before install: {runcmd}");
    assert!(runcmd.contains("enable") && runcmd.contains("derpfleet-relay.service"), "{runcmd}");
    Ok(())
}

/// Copies a directory tree (files and folders only).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type()?.is_dir() {
            if e.file_name() != ".terraform" {
                copy_tree(&src, &dst)?;
            }
        } else if e.file_type()?.is_file() {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// The AWS example cannot be initialised here (no provider downloads), but its module wiring can:
/// `terraform get` resolves every module source offline and `terraform providers` lists what each needs.
#[test]
fn fleet_example_module_tree_resolves_offline() -> Result<()> {
    let fx = Fixture::new("tf-fleet")?;
    let tree = fx.scratch.join("terraform");
    copy_tree(&workspace_root().join("terraform"), &tree)?;
    let example = tree.join("examples/fleet");
    let got = terraform_ok(&example, &fx.cli_config, &["get", "-no-color"])?;
    for region in ["fra", "iad", "sin"] {
        assert!(got.contains(&format!("- {region}.node in ../../modules/relay-node")), "{got}");
    }
    assert!(got.contains("- derpmap in ../../modules/derpmap"), "{got}");
    let providers = terraform_ok(&example, &fx.cli_config, &["providers", "-no-color"])?;
    let required: std::collections::BTreeSet<&str> = providers
        .lines()
        .filter_map(|l| l.split("provider[").nth(1))
        .filter_map(|p| p.split(']').next())
        .collect();
    assert_eq!(
        required.into_iter().collect::<Vec<_>>(),
        ["registry.terraform.io/hashicorp/aws", "registry.terraform.io/hashicorp/random"],
        "{providers}"
    );
    // The DERP map module stays provider-free (it is planned offline by the test above).
    let derpmap_line =
        providers.lines().position(|l| l.contains("module.derpmap")).context("module.derpmap")?;
    let next = providers.lines().nth(derpmap_line + 1).unwrap_or("");
    assert!(!next.contains("provider["), "module.derpmap must not need a provider:\n{providers}");
    Ok(())
}
