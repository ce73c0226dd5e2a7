//! Several handles on one pin directory at once, as a CNI call and the agent would have:
//! loading happens once and read-modify-write of shared entries loses nothing, because
//! both go under the pin directory's flock. Needs root and bpffs.

mod common;

use aya::maps::{Array, Map, MapData};
use common::{TestDatapath, unique_config};
use ferrovirt_ebpf::maps::FvNetwork;
use ferrovirt_ebpf::{Datapath, EndpointConfig, NetworkConfig};
use ferrovirt_tests::names::CleanupGuard;

const NET: u32 = 1;
const HANDLES: u8 = 4;
/// HANDLES * ENDPOINTS_PER_HANDLE endpoints join one network at once.
const ENDPOINTS_PER_HANDLE: u8 = 16;

#[test]
fn handles_opening_a_fresh_pin_dir_at_once_all_succeed() {
    let config = unique_config();
    let _remove_pins = CleanupGuard::new(config.pin_dir.display().to_string(), |dir| {
        let _ = std::fs::remove_dir_all(dir);
    });
    let start = std::sync::Barrier::new(usize::from(HANDLES));
    std::thread::scope(|s| {
        let opens: Vec<_> = (0..HANDLES)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    Datapath::open_or_load(&config).map(drop)
                })
            })
            .collect();
        for open in opens {
            open.join().expect("no panic").expect("every handle opens");
        }
    });
    let programs = std::fs::read_dir(config.pin_dir.join("progs")).unwrap();
    assert_eq!(programs.count(), 3, "each program pinned once");
}

#[test]
fn concurrent_handles_lose_no_flood_member() {
    let dp = TestDatapath::load();
    dp.add_network(NET, &NetworkConfig::default()).unwrap();
    let handles: Vec<Datapath> = (0..HANDLES)
        .map(|_| Datapath::open_or_load(dp.config()).unwrap())
        .collect();
    let start = std::sync::Barrier::new(usize::from(HANDLES));
    std::thread::scope(|s| {
        for (h, handle) in (0..HANDLES).zip(&handles) {
            let start = &start;
            s.spawn(move || {
                start.wait();
                for e in 0..ENDPOINTS_PER_HANDLE {
                    let config = EndpointConfig {
                        network: NET,
                        mac: [0x02, 0, 0, 0, h, e],
                        addresses: Vec::new(),
                        policy: None,
                    };
                    let ifindex = 900_000 + u32::from(h) * 100 + u32::from(e);
                    handle.configure_endpoint_maps(ifindex, &config).unwrap();
                }
            });
        }
    });
    let data = MapData::from_pin(dp.config().pin_dir.join("fv_networks")).unwrap();
    let networks: Array<_, FvNetwork> = Array::try_from(Map::from_map_data(data).unwrap()).unwrap();
    let members = networks.get(&NET, 0).unwrap().members().count();
    assert_eq!(members, usize::from(HANDLES * ENDPOINTS_PER_HANDLE));
}
