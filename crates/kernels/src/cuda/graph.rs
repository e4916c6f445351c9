//! CUDA graphs with programmatic dependent launch (PDL) between our kernels.
//!
//! A decode step is ~10 dependent kernels per layer, most of them a few microseconds long; in
//! a plain graph each one starts only after the previous one has fully drained, so the launch
//! latency and the first DRAM round trip of every kernel add up (docs/kernels-notes.md,
//! round 3). Every kernel of fp4_gemm.cu, moe.cu and the runtime's ops.cu begins with
//! `pdl_enter` (`griddepcontrol.wait`, then `launch_dependents`) after doing only work that
//! does not depend on its predecessor (an L2 prefetch of its weights). Such a kernel may be
//! started early: [`PdlGraph::end_capture`] turns the captured kernel -> kernel edges whose
//! destination is one of those kernels into programmatic edges. Edges into any other node
//! (cuBLAS kernels, memory copies) stay full dependencies, so correctness never rests on a
//! kernel we did not write.

use std::collections::HashSet;
use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::CudaStream;

use super::error::{drv, CudaError};

/// An instantiated graph (owned: destroyed on drop) and what the PDL pass did to it.
pub struct PdlGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    stream: Arc<CudaStream>,
    /// Kernel -> kernel edges in the captured graph.
    pub kernel_edges: usize,
    /// Of those, the edges made programmatic.
    pub programmatic_edges: usize,
}

fn check(what: &'static str, r: sys::CUresult) -> Result<(), CudaError> {
    r.result().map_err(drv(what))
}

impl PdlGraph {
    /// Ends the stream capture begun on `stream` and instantiates the graph. With `pdl`, every
    /// kernel -> kernel edge whose destination kernel is in `aware` (driver function handles,
    /// see [`super::GpuContext::pdl_kernels`]) becomes a programmatic edge first. `Ok(None)`
    /// where the capture produced no graph.
    pub fn end_capture(
        stream: &Arc<CudaStream>,
        aware: &HashSet<usize>,
        pdl: bool,
    ) -> Result<Option<Self>, CudaError> {
        stream
            .context()
            .bind_to_thread()
            .map_err(drv("bind context"))?;
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: the stream is capturing (the caller began it); graph receives the result.
        check("end graph capture", unsafe {
            sys::cuStreamEndCapture(stream.cu_stream(), &mut graph)
        })?;
        if graph.is_null() {
            return Ok(None);
        }
        let mut g = PdlGraph {
            graph,
            exec: std::ptr::null_mut(),
            stream: stream.clone(),
            kernel_edges: 0,
            programmatic_edges: 0,
        };
        if pdl {
            g.make_programmatic(aware)?;
        }
        // SAFETY: graph is a valid graph owned by g; exec receives the instance.
        check("instantiate graph", unsafe {
            sys::cuGraphInstantiateWithFlags(&mut g.exec, g.graph, 0)
        })?;
        Ok(Some(g))
    }

    fn make_programmatic(&mut self, aware: &HashSet<usize>) -> Result<(), CudaError> {
        let mut n = 0usize;
        // SAFETY: null arrays ask for the edge count only.
        check("graph edges", unsafe {
            sys::cuGraphGetEdges_v2(
                self.graph,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut n,
            )
        })?;
        let zero = sys::CUgraphEdgeData {
            from_port: 0,
            to_port: 0,
            type_: 0,
            reserved: [0; 5],
        };
        let mut from = vec![std::ptr::null_mut(); n];
        let mut to = vec![std::ptr::null_mut(); n];
        let mut data = vec![zero; n];
        // SAFETY: the three arrays hold n entries each.
        check("graph edges", unsafe {
            sys::cuGraphGetEdges_v2(
                self.graph,
                from.as_mut_ptr(),
                to.as_mut_ptr(),
                data.as_mut_ptr(),
                &mut n,
            )
        })?;
        let is_kernel = |node: sys::CUgraphNode| -> Result<bool, CudaError> {
            let mut t = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: node comes from this graph's edge list.
            check("graph node type", unsafe {
                sys::cuGraphNodeGetType(node, &mut t)
            })?;
            Ok(t == sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL)
        };
        let programmatic = sys::CUgraphEdgeData {
            from_port: sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8,
            to_port: 0,
            type_: sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8,
            reserved: [0; 5],
        };
        for i in 0..n.min(from.len()) {
            if data[i].type_ != 0 || !is_kernel(from[i])? || !is_kernel(to[i])? {
                continue;
            }
            self.kernel_edges += 1;
            // SAFETY: an all-zero parameter block is valid output storage.
            let mut p: sys::CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
            // SAFETY: to[i] is a kernel node of this graph.
            check("kernel node params", unsafe {
                sys::cuGraphKernelNodeGetParams_v2(to[i], &mut p)
            })?;
            if !aware.contains(&(p.func as usize)) {
                continue;
            }
            // SAFETY: the edge (from, to, data) exists; it is replaced by a programmatic one.
            check("remove graph edge", unsafe {
                sys::cuGraphRemoveDependencies_v2(self.graph, &from[i], &to[i], &data[i], 1)
            })?;
            // SAFETY: both nodes are kernel nodes of this graph.
            let r = unsafe {
                sys::cuGraphAddDependencies_v2(self.graph, &from[i], &to[i], &programmatic, 1)
            };
            if r != sys::CUresult::CUDA_SUCCESS {
                // Put the full dependency back before reporting: never leave an edge out.
                // SAFETY: as above, with the original edge data.
                unsafe {
                    sys::cuGraphAddDependencies_v2(self.graph, &from[i], &to[i], &data[i], 1)
                };
                check("add programmatic edge", r)?;
            }
            self.programmatic_edges += 1;
        }
        Ok(())
    }

    /// Uploads the instance so that the first launch pays no setup.
    pub fn upload(&self) -> Result<(), CudaError> {
        // SAFETY: exec and the stream are valid for self's lifetime.
        check("upload graph", unsafe {
            sys::cuGraphUpload(self.exec, self.stream.cu_stream())
        })
    }

    /// Queues one replay on the stream it was captured on.
    pub fn launch(&self) -> Result<(), CudaError> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(drv("bind context"))?;
        // SAFETY: exec and the stream are valid for self's lifetime.
        check("launch graph", unsafe {
            sys::cuGraphLaunch(self.exec, self.stream.cu_stream())
        })
    }
}

impl Drop for PdlGraph {
    fn drop(&mut self) {
        // SAFETY: both handles are owned by self and destroyed once; the stream is synchronized
        // first so that no replay still uses the instance.
        unsafe {
            let _ = sys::cuStreamSynchronize(self.stream.cu_stream());
            if !self.exec.is_null() {
                sys::cuGraphExecDestroy(self.exec);
            }
            sys::cuGraphDestroy(self.graph);
        }
    }
}
