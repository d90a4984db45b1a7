// Instantiates dispatch_general<AdamSrc> (see update_kernel.cuh).
#include "update_kernel.cuh"

namespace gatesim {
namespace cuda {
namespace upd {
template void dispatch_general<AdamSrc>(const Launch&, int, int, const AdamSrc&);
}  // namespace upd
}  // namespace cuda
}  // namespace gatesim
