//! The gRPC contract of Quiver, package `quiver.v1` (see `proto/quiver/v1/*.proto`).
#![allow(missing_docs, clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod codec;

/// Generated messages and services of `quiver.v1`.
pub mod v1 {
    tonic::include_proto!("quiver.v1");
}

/// The encoded file descriptor set of every `quiver.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/quiver_descriptor.bin"));

#[cfg(test)]
mod tests {
    use super::v1;
    use prost::Message;

    #[test]
    fn descriptor_set_names_every_service() {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).expect("descriptor set decodes");
        let services: Vec<String> = fds
            .file
            .iter()
            .filter(|f| f.package() == "quiver.v1")
            .flat_map(|f| f.service.iter().map(|s| s.name().to_string()))
            .collect();
        for s in [
            "FeatureService",
            "RegistryService",
            "AdminService",
            "ReplicationService",
            "MonitorService",
            "ClusterService",
        ] {
            assert!(services.iter().any(|x| x == s), "{s} missing from {services:?}");
        }
    }

    #[test]
    fn columnar_response_round_trips() {
        let col = v1::FeatureColumn {
            feature_ref: "user_stats:clicks".into(),
            group_version: 2,
            r#type: v1::ValueType::Int64 as i32,
            statuses: vec![v1::FeatureStatus::Present as i32, v1::FeatureStatus::NotFound as i32],
            event_times_us: vec![1_767_225_600_000_000, 0],
            int64_values: vec![7, 0],
            ..Default::default()
        };
        let resp = v1::GetOnlineFeaturesResponse { columns: vec![col] };
        let bytes = resp.encode_to_vec();
        assert_eq!(v1::GetOnlineFeaturesResponse::decode(bytes.as_slice()).expect("decodes"), resp);
    }
}
