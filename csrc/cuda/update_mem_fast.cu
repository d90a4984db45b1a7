// Instantiates dispatch_fast<MemDelta> (see update_kernel.cuh).
#include "update_kernel.cuh"

namespace gatesim {
namespace cuda {
namespace upd {
template bool dispatch_fast<MemDelta>(const Launch&, int, int, const MemDelta&);
}  // namespace upd
}  // namespace cuda
}  // namespace gatesim
