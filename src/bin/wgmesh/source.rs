//! Where a subcommand's cluster comes from: a cluster file (`--cluster`), the output of
//! `kubectl get nodes,pods -o json` (`--from-kubectl`), or a live cluster, read-only
//! (`--kubeconfig`). The last two go through the agent's own adapter and view
//! (`wgmesh_k8s::snapshot`), with the mesh settings of the agent's configuration file
//! (`--agent-config`), so they show what the agents would program.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use wgmesh::core::Cluster;
use wgmesh::core::spec::parse_cluster;

use crate::shared::{Failure, read_input};

#[derive(Debug, clap::Args)]
pub(crate) struct ClusterSource {
    /// The cluster: a JSON or YAML file, or `-` for standard input.
    #[arg(long, short, value_name = "FILE|-", env = "WGMESH_CLUSTER")]
    cluster: Option<PathBuf>,
    /// The output of `kubectl get nodes,pods -o json`: one or more files (`-`: standard input).
    #[cfg(feature = "agent")]
    #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with_all = ["cluster", "kubeconfig"])]
    from_kubectl: Vec<PathBuf>,
    /// A live cluster, read-only (it only lists): the kubeconfig at PATH, or the default one
    /// (`KUBECONFIG`, `~/.kube/config`, or in-cluster).
    #[cfg(feature = "agent")]
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "", conflicts_with = "cluster")]
    kubeconfig: Option<PathBuf>,
    /// With `--from-kubectl` or `--kubeconfig`: the agent's configuration file (as in
    /// `deploy/agent.yaml`) whose mesh settings apply; default: the defaults.
    #[cfg(feature = "agent")]
    #[arg(long, value_name = "FILE")]
    agent_config: Option<PathBuf>,
}

/// A cluster, and what reading it found worth a warning.
pub(crate) struct Loaded {
    pub(crate) cluster: Cluster,
    /// Objects or values the adapter left out, one line each.
    pub(crate) warnings: Vec<String>,
    /// Pods holding workload addresses, by `namespace/name` (Kubernetes sources only).
    pub(crate) pods: BTreeMap<String, Pod>,
    /// What each agent reports on its Node (`--kubeconfig` and `--from-kubectl` only).
    #[cfg(feature = "agent")]
    pub(crate) conditions: BTreeMap<String, wgmesh::k8s::status::PublishedCondition>,
    /// Whether the cluster came from Kubernetes objects (not a cluster file).
    pub(crate) from_kubernetes: bool,
}

/// A pod of a Kubernetes source.
pub(crate) struct Pod {
    /// The node it runs on.
    pub(crate) node: String,
    /// Its addresses.
    pub(crate) ips: Vec<IpAddr>,
}

const SOURCES: &str = "--cluster FILE, --from-kubectl FILE... or --kubeconfig [PATH]";

impl ClusterSource {
    /// Whether a Kubernetes source (`--from-kubectl`, `--kubeconfig`) was given.
    #[cfg(feature = "netlink")]
    pub(crate) fn is_kubernetes(&self) -> bool {
        #[cfg(feature = "agent")]
        return !self.from_kubectl.is_empty() || self.kubeconfig.is_some();
        #[cfg(not(feature = "agent"))]
        false
    }

    /// Whether any source was given.
    #[cfg(feature = "netlink")]
    pub(crate) fn is_given(&self) -> bool {
        self.cluster.is_some() || self.is_kubernetes()
    }

    pub(crate) fn load(&self) -> Result<Loaded, Failure> {
        #[cfg(feature = "agent")]
        if self.is_kubernetes() {
            return self.load_from_kubernetes();
        }
        let path = self
            .cluster
            .as_ref()
            .ok_or_else(|| Failure::Input(format!("a cluster is required: {SOURCES}")))?;
        let text = read_input(path, "cluster file")?;
        let cluster = parse_cluster(&text).map_err(|e| Failure::Input(e.to_string()))?;
        Ok(Loaded {
            cluster,
            warnings: Vec::new(),
            pods: BTreeMap::new(),
            #[cfg(feature = "agent")]
            conditions: BTreeMap::new(),
            from_kubernetes: false,
        })
    }

    #[cfg(feature = "agent")]
    fn load_from_kubernetes(&self) -> Result<Loaded, Failure> {
        use wgmesh::k8s::config::ConfigSpec;
        use wgmesh::k8s::snapshot::{list, parse_kubectl, snapshot};
        let spec = match &self.agent_config {
            Some(path) => ConfigSpec::parse(&read_input(path, "agent configuration")?)
                .map_err(|e| Failure::Input(format!("{}: {e}", path.display())))?,
            None => ConfigSpec::default(),
        };
        // The node name only selects the agent's own node, which a preview does not have.
        let config = spec
            .validate(|k| match k {
                "NODE_NAME" => Some("(preview)".to_owned()),
                _ => std::env::var(k).ok(),
            })
            .map_err(|e| Failure::Input(e.to_string()))?;
        let settings = config.settings;
        let (nodes, pods) = if self.from_kubectl.is_empty() {
            let runtime = wgmesh::k8s::tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Failure::Runtime(format!("cannot start the runtime: {e}")))?;
            runtime.block_on(async {
                let client = client(self.kubeconfig.as_deref()).await?;
                list(&client, settings.watch_pods)
                    .await
                    .map_err(|e| Failure::Runtime(e.to_string()))
            })?
        } else {
            let (mut nodes, mut pods) = (Vec::new(), Vec::new());
            for path in &self.from_kubectl {
                let text = read_input(path, "kubectl output")?;
                let (n, p) = parse_kubectl(&path.display().to_string(), &text)
                    .map_err(|e| Failure::Input(e.to_string()))?;
                nodes.extend(n);
                pods.extend(p);
            }
            (nodes, pods)
        };
        let snap = snapshot(&settings, &nodes, &pods).map_err(|e| Failure::Input(e.to_string()))?;
        Ok(Loaded {
            cluster: snap.cluster,
            warnings: snap.warnings.iter().map(ToString::to_string).collect(),
            pods: snap
                .pods
                .into_values()
                .map(|p| {
                    (
                        p.name,
                        Pod {
                            node: p.node,
                            ips: p.ips,
                        },
                    )
                })
                .collect(),
            conditions: snap.conditions,
            from_kubernetes: true,
        })
    }
}

/// A client from the kubeconfig at `path` (empty: the default search).
#[cfg(feature = "agent")]
async fn client(path: Option<&std::path::Path>) -> Result<wgmesh::k8s::kube::Client, Failure> {
    use wgmesh::k8s::kube::config::{Config, KubeConfigOptions, Kubeconfig};
    let config = match path.filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => {
            let kubeconfig = Kubeconfig::read_from(p)
                .map_err(|e| Failure::Input(format!("kubeconfig {}: {e}", p.display())))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| Failure::Input(format!("kubeconfig {}: {e}", p.display())))?
        }
        None => Config::infer()
            .await
            .map_err(|e| Failure::Input(format!("no kubeconfig: {e}")))?,
    };
    wgmesh::k8s::kube::Client::try_from(config)
        .map_err(|e| Failure::Runtime(format!("cannot configure the API client: {e}")))
}
