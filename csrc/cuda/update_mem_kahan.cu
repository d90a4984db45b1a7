// Instantiates the general kernels of path kKahan with delta source MemDelta
// (see update_kernel.cuh).
#include "update_kernel.cuh"

namespace gatesim {
namespace cuda {
namespace upd {
template void launch_generic<kKahan, MemDelta>(const Launch&, int, const MemDelta&);
}  // namespace upd
}  // namespace cuda
}  // namespace gatesim
