"""A GAN trained the way the DCGAN tutorial does it, on 2-D points instead of images: a generator
with BatchNorm and a discriminator with Dropout, two optimizers; D is trained on real and on
fake.detach(), then G through D (which leaves gradients in D until netD.zero_grad() at the next
iteration: correct). Progress samples from fixed noise are drawn in eval mode under no_grad.
Correct: two models, two optimizers, nothing to report."""
# guard-labels: none
import math

import torch
import torch.nn as nn
import torch.optim as optim

torch.manual_seed(0)
nz, batch_size, iters = 8, 64, 120


def real_batch(n):  # points on a ring
    a = torch.rand(n) * 2 * math.pi
    return torch.stack([a.cos(), a.sin()], 1) + 0.05 * torch.randn(n, 2)


netG = nn.Sequential(nn.Linear(nz, 64), nn.BatchNorm1d(64), nn.ReLU(True),
                     nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(True), nn.Linear(64, 2))
netD = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(0.2),
                     nn.Linear(64, 1), nn.Sigmoid())
criterion = nn.BCELoss()
fixed_noise = torch.randn(64, nz)
real_label, fake_label = 1.0, 0.0
optimizerD = optim.Adam(netD.parameters(), lr=2e-3, betas=(0.5, 0.999))
optimizerG = optim.Adam(netG.parameters(), lr=2e-3, betas=(0.5, 0.999))

for i in range(iters):
    ############################
    # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
    ###########################
    netD.zero_grad()
    real = real_batch(batch_size)
    label = torch.full((batch_size,), real_label)
    output = netD(real).view(-1)
    errD_real = criterion(output, label)
    errD_real.backward()
    noise = torch.randn(batch_size, nz)
    fake = netG(noise)
    label.fill_(fake_label)
    output = netD(fake.detach()).view(-1)
    errD_fake = criterion(output, label)
    errD_fake.backward()
    optimizerD.step()
    ############################
    # (2) Update G network: maximize log(D(G(z)))
    ###########################
    netG.zero_grad()
    label.fill_(real_label)
    output = netD(fake).view(-1)
    errG = criterion(output, label)
    errG.backward()
    optimizerG.step()
    if i % 40 == 0:
        netG.eval()
        with torch.no_grad():
            samples = netG(fixed_noise)
        netG.train()
        print(f"[{i}/{iters}] Loss_D: {(errD_real + errD_fake).item():.3f} Loss_G: {errG.item():.3f} "
              f"sample radius {samples.norm(dim=1).mean():.2f}")
