//! qcow2 metadata caches: `cache-clean-interval` drops tables unused for that long (and keeps
//! them without it), and a sweeper left behind by a closed node does not keep a tool alive.

use std::time::Duration;

use basalt_engine::{Backend, Graph, OpenFlags, Opts};
use basalt_formats::qcow2::Qcow2Node;
use basalt_reactor::{IoBuf, Reactor, ReactorConfig};
use basalt_tests::{peer, run};

fn cached_after_idle(path: &str, interval: Option<&str>) -> ((usize, usize), (usize, usize)) {
    let (p, interval) = (path.to_string(), interval.map(str::to_string));
    let r = Reactor::new(ReactorConfig::default()).unwrap();
    r.block_on(async move {
        let graph = Graph::new(basalt_formats::registry());
        let mut o = Opts::new();
        o.set("driver", "qcow2");
        o.set("file.filename", &p);
        if let Some(i) = &interval {
            o.set("cache-clean-interval", i.clone());
        }
        let node = graph.open(o, OpenFlags::read_only()).await.unwrap();
        let be = Backend::new(node.clone()).unwrap();
        for k in 0..4u64 {
            assert!(be.read(k << 20, IoBuf::new(4096)).await.res.is_ok());
        }
        let q = node.as_any().downcast_ref::<Qcow2Node>().unwrap();
        let before = q.cache_usage();
        basalt_reactor::sleep(Duration::from_millis(2600)).await;
        (before, q.cache_usage())
    })
}

#[test]
fn cache_clean_interval_drops_unused_tables() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.qcow2").to_str().unwrap().to_string();
    assert!(run(peer("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", &p, "8M"])).status.success());
    assert!(run(peer("qemu-io").args(["-c", "write -P 1 0 8M", &p])).status.success());
    let (before, after) = cached_after_idle(&p, Some("1"));
    assert!(before.0 >= 2, "tables were cached: {before:?}");
    assert_eq!(after.0, 0, "unused L2 tables are dropped after the interval");
    let (before, after) = cached_after_idle(&p, None);
    assert_eq!(before, after, "the default interval (600 s) keeps them");
}
