// Instantiates the general kernels of path kKahan with delta source AdamSrc
// (see update_kernel.cuh).
#include "update_kernel.cuh"

namespace gatesim {
namespace cuda {
namespace upd {
template void launch_generic<kKahan, AdamSrc>(const Launch&, int, const AdamSrc&);
}  // namespace upd
}  // namespace cuda
}  // namespace gatesim
