"""The paper as a branchadapt plugin set: U-GAT-IT (photo2cartoon) translator, CAM, face-ID and
group-classification losses, selective-detach splitters and the two-stage recipe."""
