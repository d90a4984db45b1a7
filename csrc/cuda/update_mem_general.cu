// Instantiates dispatch_general<MemDelta> (see update_kernel.cuh).
#include "update_kernel.cuh"

namespace gatesim {
namespace cuda {
namespace upd {
template void dispatch_general<MemDelta>(const Launch&, int, int, const MemDelta&);
}  // namespace upd
}  // namespace cuda
}  // namespace gatesim
