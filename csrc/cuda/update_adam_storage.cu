// Instantiates the general kernels of path kStorage with delta source AdamSrc
// (see update_kernel.cuh).
#include "update_kernel.cuh"

namespace gatesim {
namespace cuda {
namespace upd {
template void launch_generic<kStorage, AdamSrc>(const Launch&, int, const AdamSrc&);
}  // namespace upd
}  // namespace cuda
}  // namespace gatesim
