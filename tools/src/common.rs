//! What every command shares: the error type, gRPC error mapping, connecting to the server,
//! registry look-ups, the clock, and entity keys and values as text.

use quiver_proto::v1 as pb;
use quiver_server::auth::{AuthChannel, BearerToken};
use tonic::transport::Channel;

/// Every error is one line of text: `main` prints it after `quiver: ` and exits non-zero.
pub type Result<T> = std::result::Result<T, String>;

/// A gRPC status as one line: its code and message.
pub fn grpc(e: tonic::Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

/// A connection that sends the command line's token (if any) with every call.
pub type Conn = AuthChannel;

/// The server a command talks to, and how it proves who it is.
#[derive(Debug, Clone)]
pub struct Server {
    /// Its address (`http://host:port`).
    pub addr: String,
    /// The token sent with every call.
    pub token: BearerToken,
    /// The CA (PEM) that signed the server's certificate, for `https://` addresses.
    pub ca_pem: Option<Vec<u8>>,
}

impl Server {
    /// A CA goes with an `https://` address and only with one (the error names the flag).
    fn check_tls(&self) -> Result<()> {
        let addr = &self.addr;
        match (addr.starts_with("https://"), &self.ca_pem) {
            (true, None) => Err(format!("{addr} is TLS: give the CA that signed its certificate (--ca-cert)")),
            (false, Some(_)) => Err(format!("--ca-cert is for https:// addresses, not {addr}")),
            _ => Ok(()),
        }
    }

    /// A routing client seeded at it: in a sharded region, each entity goes straight to its
    /// slot's owner (`quiver_tools::route`).
    pub async fn router(&self) -> Result<quiver_tools::route::Router> {
        self.check_tls()?;
        quiver_tools::route::Router::connect(&self.addr, self.token.clone(), self.ca_pem.clone()).await.map_err(grpc)
    }

    /// A connection to it.
    pub async fn channel(&self) -> Result<Conn> {
        let addr = &self.addr;
        let mut endpoint = Channel::from_shared(addr.to_string()).map_err(|e| format!("bad address {addr:?}: {e}"))?;
        self.check_tls()?;
        if let Some(ca) = &self.ca_pem {
            let tls =
                tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
            endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
        }
        let ch = endpoint.connect().await.map_err(|e| format!("cannot reach {addr}: {e}"))?;
        Ok(Conn::new(ch, self.token.clone()))
    }
}

/// A group's definition (`group` or `group@N`) and its entity type, from the registry.
pub async fn fetch_group(ch: &Conn, group: &str) -> Result<(pb::FeatureGroup, pb::EntityType)> {
    let (name, version) = quiver_server::registry::parse_group_ref(group)
        .ok_or_else(|| format!("bad group reference {group:?} (group or group@N)"))?;
    let mut reg = pb::registry_service_client::RegistryServiceClient::new(ch.clone());
    let def = reg
        .get_feature_group(pb::GetFeatureGroupRequest { name: name.to_string(), version })
        .await
        .map_err(grpc)?
        .into_inner();
    let et = fetch_entity_type(ch, &def.entity_type).await?;
    Ok((def, et))
}

/// An entity type from the registry.
pub async fn fetch_entity_type(ch: &Conn, name: &str) -> Result<pb::EntityType> {
    pb::registry_service_client::RegistryServiceClient::new(ch.clone())
        .get_entity_type(pb::GetEntityTypeRequest { name: name.to_string() })
        .await
        .map_err(grpc)
        .map(tonic::Response::into_inner)
}

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// An entity key from its text: join keys comma-separated, typed by the entity type.
pub fn entity_key(et: &pb::EntityType, s: &str) -> Result<pb::EntityKey> {
    let parts: Vec<&str> = s.split(',').collect();
    if parts.len() != et.join_keys.len() {
        return Err(format!(
            "entity {s:?} has {} parts, entity type {} has {} join keys",
            parts.len(),
            et.name,
            et.join_keys.len()
        ));
    }
    let mut out = Vec::new();
    for (p, k) in parts.iter().zip(&et.join_keys) {
        let kind = match k.r#type() {
            pb::JoinKeyType::Int64 => pb::key_part::Kind::Int64Value(
                p.parse().map_err(|_| format!("join key {}: {p:?} is not an int64", k.name))?,
            ),
            _ => pb::key_part::Kind::StringValue(p.to_string()),
        };
        out.push(pb::KeyPart { kind: Some(kind) });
    }
    Ok(pb::EntityKey { parts: out })
}

/// A value of type `t` from its text; lists comma-separated.
pub fn parse_value(s: &str, t: pb::ValueType) -> Result<pb::Value> {
    use pb::value::Kind;
    let bad = || format!("{s:?} is not a {t:?}");
    let list =
        |s: &str| -> Vec<String> { s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect() };
    let kind = match t {
        pb::ValueType::Bool => Kind::BoolValue(s.parse().map_err(|_| bad())?),
        pb::ValueType::Int64 => Kind::Int64Value(s.parse().map_err(|_| bad())?),
        pb::ValueType::Float32 => Kind::Float32Value(s.parse().map_err(|_| bad())?),
        pb::ValueType::Float64 => Kind::Float64Value(s.parse().map_err(|_| bad())?),
        pb::ValueType::String => Kind::StringValue(s.to_string()),
        pb::ValueType::Bytes => Kind::BytesValue(s.as_bytes().to_vec()),
        pb::ValueType::Float32Vector => Kind::Float32Vector(pb::Float32List {
            values: list(s).iter().map(|x| x.parse().map_err(|_| bad())).collect::<Result<_>>()?,
        }),
        pb::ValueType::Int64List => Kind::Int64List(pb::Int64List {
            values: list(s).iter().map(|x| x.parse().map_err(|_| bad())).collect::<Result<_>>()?,
        }),
        pb::ValueType::StringList => Kind::StringList(pb::StringList { values: list(s) }),
        pb::ValueType::Unspecified => return Err(bad()),
    };
    Ok(pb::Value { kind: Some(kind) })
}

/// A feature status as a word (`present`, `not_found`, ...; `None` for unspecified or unknown).
pub fn status_name(status: i32) -> Option<String> {
    let s = pb::FeatureStatus::try_from(status).ok().filter(|s| *s != pb::FeatureStatus::Unspecified)?;
    Some(s.as_str_name().trim_start_matches("FEATURE_STATUS_").to_lowercase())
}

/// One cell of a column as text.
pub fn cell_text(col: &pb::FeatureColumn, i: usize) -> String {
    let status = pb::FeatureStatus::try_from(col.statuses.get(i).copied().unwrap_or(0))
        .unwrap_or(pb::FeatureStatus::Unspecified);
    if matches!(
        status,
        pb::FeatureStatus::NotFound
            | pb::FeatureStatus::Stale
            | pb::FeatureStatus::Unavailable
            | pb::FeatureStatus::Overflow
    ) {
        return format!("({})", status_name(status as i32).unwrap_or_default());
    }
    let v = match col.r#type() {
        pb::ValueType::Bool => col.bool_values.get(i).map(|v| v.to_string()),
        pb::ValueType::Int64 => col.int64_values.get(i).map(|v| v.to_string()),
        pb::ValueType::Float32 => col.float32_values.get(i).map(|v| v.to_string()),
        pb::ValueType::Float64 => col.float64_values.get(i).map(|v| format!("{v:.2}")),
        pb::ValueType::String => col.string_values.get(i).cloned(),
        pb::ValueType::Bytes => col.bytes_values.get(i).map(|v| format!("{} bytes", v.len())),
        pb::ValueType::Float32Vector => col.float32_vector_values.get(i).map(|v| format!("{:?}", v.values)),
        pb::ValueType::Int64List => col.int64_list_values.get(i).map(|v| format!("{:?}", v.values)),
        pb::ValueType::StringList => col.string_list_values.get(i).map(|v| format!("{:?}", v.values)),
        pb::ValueType::Unspecified => None,
    };
    let v = v.unwrap_or_default();
    if status == pb::FeatureStatus::Defaulted {
        format!("{v} (default)")
    } else {
        v
    }
}
