//! Kernel launches that may overlap the previous kernel on the stream: programmatic dependent
//! launch (compute 9.0+), through the driver's `cuLaunchKernelEx`.
//!
//! Why: at batch 1 a decoded token is a few hundred launches of a few µs each, and without
//! this each waits for the previous kernel to drain before its first block is scheduled, then
//! ramps up from nothing. With the attribute set, a kernel's blocks are scheduled as the
//! previous kernel's retire (once all of them have called `let_next_kernel_launch`,
//! `kernels/common.cuh`): they fetch their weights, which no kernel writes, and then
//! `wait_for_previous_kernel` until the previous grid has finished and its writes are
//! visible. Every kernel this crate launches makes both calls before it touches activations,
//! caches or outputs, so the overlap never changes a result; kernels it does not own (candle's,
//! cuBLAS's) launch as before and are waited for in full.
//!
//! Off (plain stream order) when `HELEXA_ENGINE_PDL=0`, on GPUs before compute 9.0, and when
//! cudarc's per-buffer events are on (`HELEXA_ENGINE_EVENT_TRACKING=1`: they order buffers by
//! events, which this launch path does not record).
#![allow(unsafe_code, reason = "kernel launches through the driver API")]

use std::ffi::c_void;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Result;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::sys::{
    self, CUdevice_attribute, CUlaunchAttribute, CUlaunchAttributeID, CUlaunchConfig,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, SyncOnDrop,
};

/// A kernel's arguments in order, as the driver takes them: a pointer to each value.
pub struct Args<'a> {
    stream: &'a CudaStream,
    values: Vec<Arg>,
    /// Device addresses of buffer arguments, pointed at only once the list is complete.
    addresses: Vec<u64>,
    /// Kept until the launch is queued (with event tracking on they record the buffer's use).
    guards: Vec<SyncOnDrop<'a>>,
    /// Thread-block cluster dimensions, when the kernel's blocks share memory in clusters.
    cluster: Option<(u32, u32, u32)>,
    /// Launch in plain stream order whatever the switch says (a measurement's baseline).
    plain: bool,
}

/// Where an argument's value lives.
enum Arg {
    /// With the caller, borrowed for the launch.
    Value(*mut c_void),
    /// At this index of [`Args::addresses`].
    Address(usize),
}

impl<'a> Args<'a> {
    pub fn new(stream: &'a CudaStream) -> Self {
        Self {
            stream,
            values: Vec::new(),
            addresses: Vec::new(),
            guards: Vec::new(),
            cluster: None,
            plain: false,
        }
    }

    /// Launches the grid in thread-block clusters of `dims` blocks (compute 9.0+; the grid's
    /// dimensions must be multiples of them).
    pub fn cluster(&mut self, dims: (u32, u32, u32)) -> &mut Self {
        self.cluster = Some(dims);
        self
    }

    /// Launches in plain stream order, without the programmatic attribute.
    #[cfg(test)]
    pub fn plain(&mut self) -> &mut Self {
        self.plain = true;
        self
    }

    /// A scalar (or a device address already in hand).
    pub fn value<T: DeviceRepr>(&mut self, v: &'a T) -> &mut Self {
        self.values
            .push(Arg::Value(std::ptr::from_ref(v).cast_mut().cast()));
        self
    }

    /// A buffer the kernel reads (or writes in place, as the KV cache: see `cuda.rs`).
    pub fn input<T>(&mut self, buf: &'a impl DevicePtr<T>) -> &mut Self {
        let (address, guard) = buf.device_ptr(self.stream);
        self.guards.push(guard);
        self.address(address)
    }

    /// A buffer the kernel reads, or a null pointer where there is none (the kernel must not
    /// read it then, e.g. because a length argument says 0).
    pub fn input_or_null<T>(&mut self, buf: Option<&'a impl DevicePtr<T>>) -> &mut Self {
        match buf {
            Some(buf) => self.input(buf),
            None => self.null(),
        }
    }

    /// A null pointer for a buffer the kernel then leaves alone (an optional output).
    pub fn null(&mut self) -> &mut Self {
        self.value(&NULL)
    }

    /// A buffer the kernel writes.
    pub fn output<T>(&mut self, buf: &'a mut impl DevicePtrMut<T>) -> &mut Self {
        let (address, guard) = buf.device_ptr_mut(self.stream);
        self.guards.push(guard);
        self.address(address)
    }

    fn address(&mut self, address: u64) -> &mut Self {
        self.values.push(Arg::Address(self.addresses.len()));
        self.addresses.push(address);
        self
    }

    /// Queues `f` on the stream with these arguments.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and type, and every
    /// buffer must be as large as the kernel reads and writes for `cfg`; `f` must call
    /// `wait_for_previous_kernel` before it touches any memory another kernel writes.
    pub unsafe fn launch(self, f: &CudaFunction, cfg: LaunchConfig) -> Result<()> {
        if is_omitted(f) {
            return Ok(());
        }
        let ctx = self.stream.context();
        ctx.bind_to_thread().w()?;
        let overlap = !self.plain && overlaps_previous_kernel(self.stream)?;
        let mut attributes = Vec::with_capacity(2);
        if let Some((x, y, z)) = self.cluster {
            // SAFETY: a plain-old-data union; the zero pattern is "no value" for every member.
            let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
            value.clusterDim.x = x;
            value.clusterDim.y = y;
            value.clusterDim.z = z;
            attributes.push(CUlaunchAttribute {
                id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
                pad: [0; 4],
                value,
            });
        }
        if overlap {
            // SAFETY: as above.
            let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
            value.programmaticStreamSerializationAllowed = 1;
            attributes.push(CUlaunchAttribute {
                id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                pad: [0; 4],
                value,
            });
        }
        let mut config = CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: attributes.as_mut_ptr(),
            numAttrs: u32::try_from(attributes.len()).unwrap_or(0),
        };
        let mut pointers: Vec<*mut c_void> = self
            .values
            .iter()
            .map(|arg| match *arg {
                Arg::Value(p) => p,
                Arg::Address(i) => std::ptr::from_ref(&self.addresses[i]).cast_mut().cast(),
            })
            .collect();
        // SAFETY: `pointers` points at this launch's arguments (the caller's values and
        // `addresses`), all alive until this returns; the rest is the caller's promise.
        let launch = |config: &CUlaunchConfig, pointers: &mut Vec<*mut c_void>| unsafe {
            sys::cuLaunchKernelEx(
                std::ptr::from_ref(config),
                f.cu_function(),
                pointers.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        let mut result = launch(&config, &mut pointers);
        if overlap && result == sys::CUresult::CUDA_ERROR_NOT_SUPPORTED {
            // A driver or partitioning that refuses the attribute (the last one): plain stream
            // order (the kernels' wait and trigger are no-ops then), from now on unless it may
            // be the pairing with a cluster that was refused.
            if self.cluster.is_none() {
                eprintln!(
                    "helexa-engine-cuda: programmatic dependent launch refused by the driver; off"
                );
                REFUSED.store(true, Ordering::Relaxed);
            }
            config.numAttrs -= 1;
            result = launch(&config, &mut pointers);
        }
        result.result().w()?;
        drop(self.guards);
        Ok(())
    }
}

/// Kernel-name prefixes from `HELEXA_ENGINE_OMIT` (comma-separated; a measurement aid, not a
/// mode: results are wrong with it). Their launches are skipped and their outputs left as
/// allocated, so that a decode step's time with and without one kernel class, replayed from a
/// CUDA graph, says what that class costs in the stream (its own time plus the gap it adds),
/// which per-kernel profiles taken one kernel at a time cannot.
fn omitted_prefixes() -> &'static [String] {
    static PREFIXES: OnceLock<Vec<String>> = OnceLock::new();
    PREFIXES.get_or_init(|| {
        let v: Vec<String> = std::env::var("HELEXA_ENGINE_OMIT")
            .unwrap_or_default()
            .split(',')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        if !v.is_empty() {
            eprintln!("helexa-engine-cuda: HELEXA_ENGINE_OMIT={v:?}: those kernels are not launched; results are wrong");
        }
        v
    })
}

/// The driver handles of the kernels [`omitted_prefixes`] names, as they are loaded.
static OMITTED: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

/// Records `f` (just loaded as `name`) as omitted when a prefix names it.
pub(super) fn note_omitted(name: &str, f: &CudaFunction) {
    if omitted_prefixes()
        .iter()
        .any(|p| name.starts_with(p.as_str()))
    {
        OMITTED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(f.cu_function() as usize);
    }
}

fn is_omitted(f: &CudaFunction) -> bool {
    !omitted_prefixes().is_empty()
        && OMITTED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&(f.cu_function() as usize))
}

/// Set when the driver refused the attribute once.
static REFUSED: AtomicBool = AtomicBool::new(false);

/// A null device pointer, for [`Args::input_or_null`].
static NULL: u64 = 0;

/// Whether launches on `stream` may overlap the previous kernel (see the module docs).
fn overlaps_previous_kernel(stream: &CudaStream) -> Result<bool> {
    static ON: OnceLock<bool> = OnceLock::new();
    let ctx = stream.context();
    if !super::switch(&ON, "HELEXA_ENGINE_PDL")
        || ctx.is_managing_stream_synchronization()
        || REFUSED.load(Ordering::Relaxed)
    {
        return Ok(false);
    }
    let major = super::cuda::device_attribute(
        ctx,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
    )?;
    Ok(major >= 9)
}

/// What a captured graph holds: its kernel nodes, and its edges by kind. Launches queued with
/// the programmatic attribute should be captured as programmatic edges (CUDA 12.3+); a graph
/// whose edges are all full ones waits for each kernel to drain, as without the attribute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphEdges {
    pub nodes: usize,
    pub kernel_nodes: usize,
    /// Stream-ordered allocations and frees captured as graph nodes.
    pub memory_nodes: usize,
    pub edges: usize,
    pub programmatic_edges: usize,
}

/// Counts [`GraphEdges`] of a captured (not yet destroyed) graph.
pub fn graph_edges(graph: sys::CUgraph) -> Result<GraphEdges> {
    let mut n_nodes = 0usize;
    // SAFETY: a null array asks for the count only; `graph` is a live graph (the caller's).
    unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut n_nodes) }
        .result()
        .w()?;
    let mut nodes = vec![std::ptr::null_mut(); n_nodes];
    // SAFETY: `nodes` holds n_nodes entries.
    unsafe { sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut n_nodes) }
        .result()
        .w()?;
    let (mut kernel_nodes, mut memory_nodes) = (0, 0);
    for &node in &nodes[..n_nodes] {
        let mut kind = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
        // SAFETY: `node` belongs to the live graph.
        unsafe { sys::cuGraphNodeGetType(node, &mut kind) }
            .result()
            .w()?;
        kernel_nodes += usize::from(kind == sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL);
        memory_nodes += usize::from(matches!(
            kind,
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC
                | sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE
        ));
    }
    let mut n_edges = 0usize;
    // SAFETY: null arrays ask for the count only.
    unsafe {
        sys::cuGraphGetEdges_v2(
            graph,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut n_edges,
        )
    }
    .result()
    .w()?;
    let mut from = vec![std::ptr::null_mut(); n_edges];
    let mut to = vec![std::ptr::null_mut(); n_edges];
    // SAFETY: an all-zero edge datum is a valid (default) one; it is overwritten below.
    let mut data = vec![unsafe { std::mem::zeroed::<sys::CUgraphEdgeData>() }; n_edges];
    // SAFETY: the three arrays hold n_edges entries each.
    unsafe {
        sys::cuGraphGetEdges_v2(
            graph,
            from.as_mut_ptr(),
            to.as_mut_ptr(),
            data.as_mut_ptr(),
            &mut n_edges,
        )
    }
    .result()
    .w()?;
    let programmatic_edges = data[..n_edges]
        .iter()
        .filter(|d| {
            d.type_ == sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8
        })
        .count();
    Ok(GraphEdges {
        nodes: n_nodes,
        kernel_nodes,
        memory_nodes,
        edges: n_edges,
        programmatic_edges,
    })
}
